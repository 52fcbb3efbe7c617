"""The data layer: raw datasets (synthetic, LoveDA, ISPRS), transforms, rare-class sampling, the
deterministic training stream, and config → datasets."""

from lpcgma.data.build import DomainData, build_datasets
from lpcgma.data.classes import IGNORE_INDEX, ISPRS_CLASSES, LOVEDA_CLASSES, MEAN_STD, ClassInfo
from lpcgma.data.errors import DataError, DatasetNotFoundError
from lpcgma.data.isprs import ISPRSPatches, prepare_isprs
from lpcgma.data.loveda import LoveDA
from lpcgma.data.sampling import RareClassSampler, class_histograms
from lpcgma.data.stream import TrainStream
from lpcgma.data.synthetic import SyntheticAerial, write_synthetic_loveda
from lpcgma.data.transforms import EvalTransform, TrainTransform

__all__ = [
    "IGNORE_INDEX",
    "ISPRS_CLASSES",
    "LOVEDA_CLASSES",
    "MEAN_STD",
    "ClassInfo",
    "DataError",
    "DatasetNotFoundError",
    "DomainData",
    "EvalTransform",
    "ISPRSPatches",
    "LoveDA",
    "RareClassSampler",
    "SyntheticAerial",
    "TrainStream",
    "TrainTransform",
    "build_datasets",
    "class_histograms",
    "prepare_isprs",
    "write_synthetic_loveda",
]
