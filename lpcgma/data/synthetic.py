"""A procedural two-domain aerial benchmark with LoveDA's seven classes.

Rural tiles (the source) are large irregular fields (agriculture, woods), winding roads and rivers
and small scattered houses; urban tiles (the target) are a rotated road grid whose blocks hold many
rectangular buildings of varying size, with parks, canals and a few barren or farmed plots. Beyond
layout and class frequencies the domains differ in texture (each class has a domain-specific
texture pattern and frequency) and radiometry (gain, offset, colour cast, noise, shadow length),
and a tile can be rendered as RGB or as IRRG false colour (NIR, R, G: vegetation is bright red),
each class having its own near-infrared reflectance. Within a domain every class keeps a distinct
colour/texture signature, so the task stays learnable. Generation is numpy-only and deterministic
in (seed, domain, split, index).

The shift is controllable: a domain rendered at ``shift`` s from another (`shift_from`) takes the
blend of the two looks (reflectances, radiometry and shadows interpolated linearly; each class's
texture the other domain's texture at weight 1 − s plus its own at weight s; material variants
kept with their probability scaled the same way) and, for each tile independently, its own layout
with probability s, else the other domain's. s = 1 is the domain as it is, s = 0 the other domain
exactly (same style and layout statistics); the sensor is chosen separately.

The palette is chosen separately too. With ``palette="own"`` (the default) each domain has its own
materials: urban grey roofs, dark asphalt, paved yards — and at shift ≥ 0.5 four urban classes are
nearer, in mean colour, to another rural class than to their own (building to barren, road to
background, …): a class painted in another class's colours, which no label-free method can undo.
With ``palette="source"`` the domain keeps `shift_from`'s class reflectances and material variants,
so the shift is radiometry, textures, shadows and layouts only and each class stays nearest its own
source class (RESULTS.md, issue 20).

So are the layouts. With ``layouts="shifted"`` (the default) each tile takes its own domain's layout
with probability s, as above. With ``layouts="source"`` every tile takes `shift_from`'s layout at any
s: the shift is the look alone (the appearance shift of synthetic-to-real and cross-city benchmarks,
where the scene grammar stays and the radiometry, textures and shadows change).

And so are the textures. With ``textures="own"`` (the default) each urban class has its own texture.
Two of them are what a source-trained network reads as rural barren's fine speckle: agriculture's
narrow rows (period 3 px) and the yards' speckle (background). From the look-only task's source model
62 % of the target's agriculture pixels are predicted barren, and 86 % of those it is confident about
(RESULTS.md, session 16): a class in another class's texture, the textural twin of the palette's
aliasing. ``textures="distinct"`` renders those two classes with textures that stay nearer their own
(rows of period 6, paving patches of noise scale 6): the textures still shift, but no target class takes
another source class's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpcgma.data.classes import SYNTHETIC_CLASSES, ClassInfo

Domain = Literal["rural", "urban"]
Split = Literal["train", "val", "test"]
Sensor = Literal["rgb", "irrg"]
Palette = Literal["own", "source"]
Layouts = Literal["shifted", "source"]
Textures = Literal["own", "distinct"]
Sample = dict[str, torch.Tensor | str]

BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(7)
_DOMAIN_IDS = {"rural": 0, "urban": 1}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_SENSOR_BANDS = {"rgb": [0, 1, 2], "irrg": [3, 0, 1]}  # indices into (R, G, B, NIR)


@dataclass(frozen=True)
class _Texture:
    kind: Literal["noise", "stripes", "speckle"]  # smooth value noise, oriented rows, per-pixel noise
    scale: float  # pixels: noise cell size or stripe period
    amplitude: float  # relative modulation of the reflectance


@dataclass(frozen=True)
class _Variant:
    """Regions of class `cls` that, with probability `prob`, blend towards another reflectance."""

    cls: int
    reflectance: tuple[float, float, float, float]  # (R, G, B, NIR)
    prob: float  # share of the class's regions that take the variant
    blend: tuple[float, float]  # blend weight range towards the variant (1 = the variant's colour)


@dataclass(frozen=True)
class _Style:
    """How a domain looks: per-class reflectance (R, G, B, NIR) and texture, then the radiometry.

    A class's texture is a sum of layers (one for a domain's own style, two in a blend of styles).
    """

    reflectance: tuple[tuple[float, float, float, float], ...]
    textures: tuple[tuple[_Texture, ...], ...]
    region_variation: float  # per-region (field, block, building) brightness spread
    shadow: int  # building shadow length in pixels
    gain: tuple[float, float, float]  # per output band
    offset: tuple[float, float, float]  # per output band (haze, colour cast)
    noise: float  # sensor noise std (reflectance units)
    variants: tuple[_Variant, ...] = ()  # per-region material variants (ripe fields, roof types)


_STYLES: dict[str, _Style] = {
    "rural": _Style(
        reflectance=(
            (0.38, 0.42, 0.33, 0.42),  # background: grass, mixed low cover
            (0.62, 0.34, 0.28, 0.30),  # building: red tiled roofs
            (0.55, 0.52, 0.46, 0.38),  # road: light dirt/concrete
            (0.16, 0.25, 0.24, 0.04),  # water: green-brown
            (0.66, 0.58, 0.46, 0.48),  # barren: tan soil
            (0.13, 0.27, 0.13, 0.58),  # forest: dark green
            (0.42, 0.52, 0.26, 0.52),  # agriculture: green crops (ripening varies per field)
        ),
        textures=(
            (_Texture("noise", 14, 0.18),),
            (_Texture("noise", 3, 0.06),),
            (_Texture("noise", 20, 0.06),),
            (_Texture("noise", 30, 0.06),),
            (_Texture("speckle", 1, 0.16),),
            (_Texture("noise", 5, 0.40),),
            (_Texture("stripes", 8, 0.22),),
        ),
        region_variation=0.12,
        shadow=2,
        gain=(1.0, 1.0, 1.0),
        offset=(0.0, 0.02, 0.02),
        noise=0.015,
        variants=(
            _Variant(AGRICULTURE, (0.62, 0.56, 0.32, 0.34), 1.0, (0.0, 0.6)),  # fields ripen unevenly
            _Variant(BUILDING, (0.52, 0.52, 0.54, 0.40), 0.35, (1.0, 1.0)),  # grey roofs
            _Variant(ROAD, (0.33, 0.33, 0.35, 0.24), 0.4, (1.0, 1.0)),  # asphalt roads
        ),
    ),
    "urban": _Style(
        reflectance=(
            (0.50, 0.49, 0.47, 0.34),  # background: pavement, yards
            (0.70, 0.70, 0.72, 0.42),  # building: grey/white flat roofs
            (0.26, 0.26, 0.28, 0.20),  # road: dark asphalt
            (0.10, 0.16, 0.28, 0.03),  # water: dark blue
            (0.58, 0.48, 0.38, 0.42),  # barren: construction soil
            (0.18, 0.32, 0.16, 0.55),  # forest: park trees
            (0.46, 0.55, 0.30, 0.50),  # agriculture: allotments
        ),
        textures=(
            (_Texture("speckle", 1, 0.10),),
            (_Texture("noise", 10, 0.05),),
            (_Texture("noise", 4, 0.08),),
            (_Texture("noise", 16, 0.05),),
            (_Texture("noise", 4, 0.28),),
            (_Texture("noise", 2.5, 0.35),),
            (_Texture("stripes", 3, 0.28),),
        ),
        region_variation=0.20,
        shadow=4,
        gain=(1.2, 1.05, 0.95),
        offset=(-0.03, 0.02, 0.06),
        noise=0.025,
        variants=(
            _Variant(BUILDING, (0.60, 0.36, 0.30, 0.32), 0.2, (1.0, 1.0)),  # red tiled roofs
            _Variant(FOREST, (0.24, 0.36, 0.20, 0.48), 0.4, (0.0, 1.0)),  # lighter deciduous trees
        ),
    ),
}

# textures="distinct": the urban classes whose own texture imitates a rural class's (module doc)
_DISTINCT_TEXTURES: dict[str, dict[int, _Texture]] = {
    "urban": {BACKGROUND: _Texture("noise", 6, 0.10), AGRICULTURE: _Texture("stripes", 6, 0.28)},
}


def with_distinct_textures(style: _Style, domain: Domain) -> _Style:
    """`style` with `domain`'s distinct textures (`_DISTINCT_TEXTURES`) in place of its own."""
    replaced = _DISTINCT_TEXTURES.get(domain, {})
    textures = tuple((replaced[c],) if c in replaced else t for c, t in enumerate(style.textures))
    return dataclasses.replace(style, textures=textures)


# Rural field classes (background, building, road, water, barren, forest, agriculture).
_RURAL_FIELD_P = (0.15, 0.0, 0.0, 0.02, 0.06, 0.17, 0.60)
# Urban block types (built, park, barren, water, farmed, plaza) and the class filling each; built
# blocks then get buildings on lots.
_URBAN_BLOCK_P = (0.70, 0.09, 0.06, 0.035, 0.05, 0.065)
_BUILT, _PARK, _BLOCK_CLASS = 0, 1, (BACKGROUND, FOREST, BARREN, WATER, AGRICULTURE, BACKGROUND)


def _lerp(a: tuple[float, ...], b: tuple[float, ...], s: float) -> tuple[float, ...]:
    return tuple((1 - s) * x + s * y for x, y in zip(a, b, strict=True))


def with_palette(style: _Style, palette_from: _Style) -> _Style:
    """`style` with `palette_from`'s class reflectances and material variants (radiometry, textures
    and shadows kept): the look of a domain that shares the other's materials."""
    return dataclasses.replace(style, reflectance=palette_from.reflectance, variants=palette_from.variants)


def blend_styles(a: _Style, b: _Style, s: float) -> _Style:
    """The look at shift `s` from style `a` (s = 0) to style `b` (s = 1); either end is that style."""
    if not 0 <= s <= 1:
        raise ValueError(f"a style blend needs 0 <= s <= 1, got {s}")
    if s in (0, 1):
        return b if s == 1 else a

    def layers(ta: tuple[_Texture, ...], tb: tuple[_Texture, ...]) -> tuple[_Texture, ...]:
        weighted = [(t, 1 - s) for t in ta] + [(t, s) for t in tb]
        return tuple(_Texture(t.kind, t.scale, t.amplitude * w) for t, w in weighted)

    variants = [(v, 1 - s) for v in a.variants] + [(v, s) for v in b.variants]
    return _Style(
        reflectance=tuple(_lerp(ra, rb, s) for ra, rb in zip(a.reflectance, b.reflectance, strict=True)),  # type: ignore[misc]
        textures=tuple(layers(ta, tb) for ta, tb in zip(a.textures, b.textures, strict=True)),
        region_variation=(1 - s) * a.region_variation + s * b.region_variation,
        shadow=round((1 - s) * a.shadow + s * b.shadow),
        gain=_lerp(a.gain, b.gain, s),  # type: ignore[arg-type]
        offset=_lerp(a.offset, b.offset, s),  # type: ignore[arg-type]
        noise=(1 - s) * a.noise + s * b.noise,
        variants=tuple(_Variant(v.cls, v.reflectance, v.prob * w, v.blend) for v, w in variants),
    )


class SyntheticAerial(Dataset[Sample]):
    """Raw samples ``{"image": uint8 [3,H,W], "mask": int64 [H,W], "name"}`` of one domain and split.

    Tile ``i`` depends only on (seed, domain, split, i) and is generated on first access, then cached.
    `sensor` picks the bands: ``rgb`` or ``irrg`` (NIR, R, G false colour). With `shift_from` set to
    the other domain, `shift` in [0, 1] moves this domain's look and layouts toward it (module doc):
    1 = this domain as it is, 0 = `shift_from`'s style and layouts.
    """

    classes: ClassInfo = SYNTHETIC_CLASSES

    def __init__(
        self,
        domain: Domain = "rural",
        split: Split = "train",
        num_tiles: int = 64,
        tile_size: int = 256,
        seed: int = 0,
        sensor: Sensor = "rgb",
        shift: float = 1.0,
        shift_from: Domain | None = None,
        palette: Palette = "own",
        layouts: Layouts = "shifted",
        *,
        textures: Textures = "own",
    ) -> None:
        for key, value, choices in (
            ("domain", domain, _DOMAIN_IDS),
            ("shift_from", shift_from or domain, _DOMAIN_IDS),
            ("split", split, _SPLIT_IDS),
            ("sensor", sensor, _SENSOR_BANDS),
            ("palette", palette, {"own": 0, "source": 1}),
            ("layouts", layouts, {"shifted": 0, "source": 1}),
            ("textures", textures, {"own": 0, "distinct": 1}),
        ):
            if value not in choices:
                raise ValueError(f"SyntheticAerial {key}={value!r}: expected one of {sorted(choices)}")
        if num_tiles < 1 or tile_size < 8:
            raise ValueError(f"SyntheticAerial needs num_tiles >= 1 and tile_size >= 8, got {num_tiles}, {tile_size}")
        if not 0 <= shift <= 1:
            raise ValueError(f"SyntheticAerial shift={shift!r}: expected a strength in [0, 1]")
        self.domain, self.split, self.sensor = domain, split, sensor
        self.num_tiles, self.tile_size, self.seed = num_tiles, tile_size, seed
        for key, value in (("palette", palette), ("layouts", layouts)):
            if value == "source" and shift_from is None:
                raise ValueError(f"SyntheticAerial {key}='source' needs shift_from: whose {key} to take")
        self.shift, self.shift_from, self.palette, self.layouts = shift, shift_from, palette, layouts
        self.textures = textures
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_tiles

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile `index` as numpy (image uint8 [3,H,W], mask uint8 [H,W]), without caching it."""
        key = [self.seed, _DOMAIN_IDS[self.domain], _SPLIT_IDS[self.split], index]
        own_style = _STYLES[self.domain]
        if self.palette == "source":
            assert self.shift_from is not None
            own_style = with_palette(own_style, _STYLES[self.shift_from])
        if self.textures == "distinct":
            own_style = with_distinct_textures(own_style, self.domain)
        source = self.shift_from
        if source is None or source == self.domain or (self.shift == 1 and self.layouts == "shifted"):
            return generate_tile(np.random.default_rng(key), self.domain, self.tile_size, self.sensor, own_style)
        # the layout's coin has a stream of its own: the tile's stream is the unshifted tile's
        coin = np.random.default_rng([*key, 1]).random()
        own_layout = self.layouts == "shifted" and coin < self.shift
        style = blend_styles(_STYLES[source], own_style, self.shift)
        layout = self.domain if own_layout else source
        return generate_tile(np.random.default_rng(key), layout, self.tile_size, self.sensor, style)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_tiles:
            raise IndexError(f"tile {index} out of range for {self.num_tiles} tiles")
        if index not in self._cache:
            self._cache[index] = self.generate(index)
        image, mask = self._cache[index]
        return {
            "image": torch.from_numpy(image.copy()),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "name": f"{self.domain}_{self.split}_{index:05d}",
        }


def generate_tile(
    rng: np.random.Generator, domain: Domain, size: int, sensor: Sensor, style: _Style | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One tile with `domain`'s layout, rendered in `style` (default: the domain's own):
    image uint8 [3, size, size] and class mask uint8 [size, size]."""
    layout = _rural_layout if domain == "rural" else _urban_layout
    mask, regions = layout(rng, size, size)
    return _render(rng, mask, regions, style or _STYLES[domain], sensor), mask.astype(np.uint8)


def write_synthetic_loveda(
    root: str | Path,
    num_tiles: int = 16,
    tile_size: int = 256,
    seed: int = 0,
    sensor: Sensor = "irrg",
    shift: float = 1.0,
    palette: Palette = "own",
    layouts: Layouts = "shifted",
    textures: Textures = "own",
) -> Path:
    """Write the synthetic benchmark in the official LoveDA layout under `root`; return `root`.

    ``{Train,Val,Test}/{Rural,Urban}/images_png/<id>.png`` with raw masks in ``masks_png`` (class + 1,
    0 = no-data; none for Test, as in LoveDA). Ids count up across splits and domains. `sensor` is
    the Urban (target) domain's sensor, `shift` its shift strength from Rural, `palette` whose
    materials, `layouts` whose layouts and `textures` which textures it has (module doc); Rural tiles
    are RGB.
    """
    root = Path(root)
    next_id = 0
    for split in ("train", "val", "test"):
        for domain in ("rural", "urban"):
            ds = (
                SyntheticAerial(
                    domain, split, num_tiles, tile_size, seed, sensor, shift, "rural", palette, layouts,
                    textures=textures,
                )  # fmt: skip
                if domain == "urban"
                else SyntheticAerial(domain, split, num_tiles, tile_size, seed, "rgb")
            )
            folder = root / split.capitalize() / domain.capitalize()
            (folder / "images_png").mkdir(parents=True, exist_ok=True)
            if split != "test":
                (folder / "masks_png").mkdir(parents=True, exist_ok=True)
            for i in range(len(ds)):
                image, mask = ds.generate(i)
                Image.fromarray(image.transpose(1, 2, 0)).save(folder / "images_png" / f"{next_id}.png")
                if split != "test":
                    Image.fromarray((mask + 1).astype(np.uint8)).save(folder / "masks_png" / f"{next_id}.png")
                next_id += 1
    return root


# ------------------------------------------------------------------------------------------ fields
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ys, xs


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise [H, W] (std ≈ 0.6): a random lattice every `cell` pixels, smoothstep-interpolated."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    lattice = rng.standard_normal((gh, gw)).astype(np.float32)
    y, x = np.arange(h, dtype=np.float32) / cell, np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bottom = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy  # type: ignore[no-any-return]


def _rotated(
    rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, max_angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along, v across) rotated by a random angle in [-max_angle, max_angle]."""
    a = rng.uniform(-max_angle, max_angle)
    return xs * math.cos(a) + ys * math.sin(a), -xs * math.sin(a) + ys * math.cos(a)


def _band(
    rng: np.random.Generator,
    ys: np.ndarray,
    xs: np.ndarray,
    width: tuple[float, float],
    amplitude: tuple[float, float],
    max_angle: float = math.pi,
) -> np.ndarray:
    """A winding band (road, river, canal) crossing the tile: bool [H, W]."""
    u, v = _rotated(rng, ys, xs, max_angle)
    h, w = ys.shape
    centre = float(v[h // 2, w // 2]) + rng.uniform(-0.35, 0.35) * min(h, w)
    path = centre + rng.uniform(*amplitude) * np.sin(2 * math.pi * u / rng.uniform(120, 320) + rng.uniform(0, 6.3))
    path += rng.uniform(0, amplitude[1] / 3) * np.sin(2 * math.pi * u / rng.uniform(30, 80) + rng.uniform(0, 6.3))
    return np.abs(v - path) < rng.uniform(*width) / 2  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ layouts
def _rural_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Irregular fields (warped jittered-grid Voronoi cells), woods, rivers, ponds, winding roads, houses."""
    ys, xs = _grid(h, w)
    cell = rng.uniform(40, 72)
    pad = 2 * cell  # shifts coordinates so that every neighbouring lattice index stays >= 0
    yy = ys + 12 * _value_noise(rng, h, w, 40) + pad
    xx = xs + 12 * _value_noise(rng, h, w, 40) + pad
    gh, gw = int((h + 2 * pad) / cell) + 2, int((w + 2 * pad) / cell) + 2
    seed_y = ((np.arange(gh)[:, None] + rng.uniform(0.1, 0.9, (gh, gw))) * cell).astype(np.float32).ravel()
    seed_x = ((np.arange(gw)[None, :] + rng.uniform(0.1, 0.9, (gh, gw))) * cell).astype(np.float32).ravel()
    base = (yy // cell).astype(np.int64) * gw + (xx // cell).astype(np.int64)
    best = np.full((h, w), np.inf, dtype=np.float32)
    regions = base
    for delta in (-gw - 1, -gw, -gw + 1, -1, 0, 1, gw - 1, gw, gw + 1):
        idx = base + delta
        d = (seed_y[idx] - yy) ** 2 + (seed_x[idx] - xx) ** 2
        closer = d < best
        best = np.where(closer, d, best)
        regions = np.where(closer, idx, regions)
    mask = rng.choice(7, size=gh * gw, p=_RURAL_FIELD_P)[regions]
    mask[_value_noise(rng, h, w, 64) > 0.55] = FOREST  # woods spanning several fields
    if rng.random() < 0.35:
        mask[_band(rng, ys, xs, (5, 14), (8, 30))] = WATER  # river
    if rng.random() < 0.25:  # pond
        cy0, cx0, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 18)
        mask[np.hypot(ys - cy0, xs - cx0) < r * (1 + 0.4 * _value_noise(rng, h, w, 8))] = WATER
    for _ in range(1 + int(rng.random() < 0.5)):
        mask[_band(rng, ys, xs, (3, 5.5), (5, 25))] = ROAD
    # scattered small houses: a few villages plus isolated farms, whose barns can be larger
    area = h * w / 256**2
    centres = [(rng.uniform(0, h), rng.uniform(0, w), int(rng.integers(4, 14))) for _ in range(rng.poisson(2.0 * area))]
    centres += [(rng.uniform(0, h), rng.uniform(0, w), 1) for _ in range(rng.poisson(6 * area))]
    next_region = gh * gw
    for cy0, cx0, count in centres:
        for _ in range(count):
            y0 = int(cy0 + (rng.normal(0, 22) if count > 1 else 0))
            x0 = int(cx0 + (rng.normal(0, 22) if count > 1 else 0))
            big = 21 if count == 1 else 13
            hh, ww = int(rng.integers(5, big)), int(rng.integers(5, big))
            ys0, xs0 = slice(max(0, y0), max(0, y0 + hh)), slice(max(0, x0), max(0, x0 + ww))
            free = (mask[ys0, xs0] != ROAD) & (mask[ys0, xs0] != WATER)
            mask[ys0, xs0][free] = BUILDING
            regions[ys0, xs0][free] = next_region
            next_region += 1
    return mask, regions


def _urban_layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A rotated road grid; blocks are built (lots with buildings), parks, barren, water, farmed, plazas."""
    ys, xs = _grid(h, w)
    su, sv, road_w = rng.uniform(40, 72), rng.uniform(40, 72), float(rng.integers(4, 8))
    u, v = _rotated(rng, ys, xs, 0.6)
    u, v = u + rng.uniform(0, su), v + rng.uniform(0, sv)
    fu, fv = np.floor(u / su), np.floor(v / sv)
    iu, iv = u - fu * su - road_w, v - fv * sv - road_w  # position inside the block, past its roads
    bu, bv = (fu - fu.min()).astype(np.int64), (fv - fv.min()).astype(np.int64)
    blocks = bu * (int(bv.max()) + 1) + bv
    nb = int(blocks.max()) + 1
    road = (iu < 0) | (iv < 0)
    kind = rng.choice(len(_URBAN_BLOCK_P), size=nb, p=_URBAN_BLOCK_P)
    mask = np.asarray(_BLOCK_CLASS)[kind][blocks]
    # lots: 1-3 per block side, each with a building inset by random margins (some lots stay empty)
    lots_u, lots_v = rng.integers(1, 4, nb)[blocks], rng.integers(1, 4, nb)[blocks]
    lot_u, lot_v = (su - road_w) / lots_u, (sv - road_w) / lots_v
    ku = np.clip(np.floor(iu / lot_u), 0, 2).astype(np.int64)
    kv = np.clip(np.floor(iv / lot_v), 0, 2).astype(np.int64)
    pu, pv = iu - ku * lot_u, iv - kv * lot_v
    margin = rng.uniform(1, 6, (nb, 3, 3, 4)).astype(np.float32)[blocks, ku, kv]
    keep = (rng.random((nb, 3, 3)) < 0.85)[blocks, ku, kv]
    inside = (
        (pu > margin[..., 0]) & (pu < lot_u - margin[..., 1]) & (pv > margin[..., 2]) & (pv < lot_v - margin[..., 3])
    )
    built = kind[blocks] == _BUILT
    building = built & keep & inside & ~road
    mask[built & (_value_noise(rng, h, w, 4) > 0.8)] = FOREST  # street trees in yards
    park = kind[blocks] == _PARK
    mask[park & (_value_noise(rng, h, w, 12) < -0.4)] = BACKGROUND  # lawns and paths in parks
    mask[building] = BUILDING
    if rng.random() < 0.2:
        mask[_band(rng, ys, xs, (6, 11), (0, 0))] = WATER  # canal
    mask[road] = ROAD  # roads (and bridges) on top
    regions = np.where(building, nb + (blocks * 3 + ku) * 3 + kv, blocks)
    return mask, regions


# ------------------------------------------------------------------------------------------ render
def _texture(rng: np.random.Generator, tex: _Texture, regions: np.ndarray) -> np.ndarray:
    h, w = regions.shape
    if tex.kind == "speckle":
        return rng.standard_normal((h, w)).astype(np.float32)
    if tex.kind == "noise":
        return _value_noise(rng, h, w, tex.scale) / 0.6
    ys, xs = _grid(h, w)  # stripes: one row orientation and phase per region (field)
    n = int(regions.max()) + 1
    angle, phase = rng.uniform(0, math.pi, n)[regions], rng.uniform(0, 2 * math.pi, n)[regions]
    return np.sin(2 * math.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / tex.scale + phase).astype(np.float32)


def _render(
    rng: np.random.Generator, mask: np.ndarray, regions: np.ndarray, style: _Style, sensor: Sensor
) -> np.ndarray:
    """Reflectance per class and region, textures, shadows, then the domain and tile radiometry."""
    h, w = mask.shape
    n = int(regions.max()) + 1
    refl = np.asarray(style.reflectance, dtype=np.float32)[mask]  # [H, W, 4]
    for var in style.variants:
        t = (rng.random(n) < var.prob) * rng.uniform(*var.blend, n)
        t_px = (t.astype(np.float32)[regions] * (mask == var.cls))[..., None]
        refl = refl * (1 - t_px) + np.asarray(var.reflectance, dtype=np.float32) * t_px
    mod = 1 + style.region_variation * rng.uniform(-1, 1, n).astype(np.float32)[regions]
    for c in np.unique(mask):
        sel = mask == c
        modulation = sum(tex.amplitude * _texture(rng, tex, regions)[sel] for tex in style.textures[c])
        mod[sel] *= 1 + modulation
    refl *= mod[..., None]
    s = style.shadow
    shadow = np.zeros((h, w), dtype=bool)
    shadow[s:, s:] = (mask == BUILDING)[:-s, :-s]
    refl[shadow & (mask != BUILDING)] *= 0.55
    x = refl[..., _SENSOR_BANDS[sensor]]
    tile_gain = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, 3)
    x = x * np.asarray(style.gain, dtype=np.float32) * tile_gain.astype(np.float32)
    x += np.asarray(style.offset, dtype=np.float32) + rng.normal(0, 0.02, 3).astype(np.float32)
    x += style.noise * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1).copy()  # type: ignore[no-any-return]
