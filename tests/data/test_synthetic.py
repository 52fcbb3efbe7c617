import numpy as np
import pytest
import torch

from lpcgma.data.loveda import LoveDA
from lpcgma.data.synthetic import (
    AGRICULTURE,
    BACKGROUND,
    BARREN,
    BUILDING,
    FOREST,
    ROAD,
    WATER,
    SyntheticAerial,
    write_synthetic_loveda,
)

N, SIZE = 12, 128


@pytest.fixture(scope="module")
def domains() -> dict[str, list[dict]]:
    return {d: list(SyntheticAerial(d, "train", N, SIZE, seed=0)) for d in ("rural", "urban")}


def _fractions(samples: list[dict]) -> np.ndarray:
    hist = sum(np.bincount(s["mask"].numpy().ravel(), minlength=7) for s in samples)
    return hist / hist.sum()


def test_sample_format_for_any_tile_size():
    for size in (37, 96):
        s = SyntheticAerial("urban", "val", 2, size, seed=1, sensor="irrg")[1]
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, size, size)
        assert s["mask"].dtype == torch.int64 and s["mask"].shape == (size, size)
        assert int(s["mask"].min()) >= 0 and int(s["mask"].max()) <= 6
        assert s["name"] == "urban_val_00001"


def test_deterministic_in_seed_domain_split_index():
    a = SyntheticAerial("rural", "train", 4, 64, seed=3)
    b = SyntheticAerial("rural", "train", 4, 64, seed=3)
    _ = [b[i] for i in (3, 0, 2)]  # access order and caching do not matter
    for i in (0, 3):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    assert torch.equal(a[1]["image"], a[1]["image"])
    others = [
        SyntheticAerial("rural", "train", 4, 64, seed=4)[0],
        SyntheticAerial("rural", "val", 4, 64, seed=3)[0],
        SyntheticAerial("urban", "train", 4, 64, seed=3)[0],
        a[1],
    ]
    for o in others:
        assert not torch.equal(o["mask"], a[0]["mask"])


def test_returned_tensors_do_not_alias_the_cache():
    ds = SyntheticAerial("rural", "train", 1, 32)
    s = ds[0]
    s["image"].zero_()
    s["mask"].fill_(255)
    assert ds[0]["image"].any() and int(ds[0]["mask"].max()) < 7


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="domain"):
        SyntheticAerial("desert", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sensor"):
        SyntheticAerial("rural", "train", sensor="sar")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        SyntheticAerial("rural", "train", 2, 32)[2]


def test_class_frequencies_differ_between_domains(domains):
    rural, urban = _fractions(domains["rural"]), _fractions(domains["urban"])
    assert rural[AGRICULTURE] + rural[FOREST] > urban[AGRICULTURE] + urban[FOREST] + 0.3
    assert urban[BUILDING] + urban[ROAD] > rural[BUILDING] + rural[ROAD] + 0.25
    for f in (rural, urban):  # water and barren are the rare classes
        assert max(f[WATER], f[BARREN]) < 0.1


def test_every_class_present_in_each_domain(domains):
    for samples in domains.values():
        assert (_fractions(samples) > 0).all()


def test_object_scale_differs(domains):
    """Rural houses are small and scattered; urban buildings are larger and dense."""

    def mean_building_fraction_per_tile(samples):
        return np.mean([(s["mask"] == BUILDING).float().mean().item() for s in samples])

    assert mean_building_fraction_per_tile(domains["urban"]) > 5 * mean_building_fraction_per_tile(
        domains["rural"]
    )


def test_forest_texture_differs_between_domains(domains):
    """Urban park trees have a finer crown texture (larger pixel-to-pixel contrast) than rural woods."""

    def forest_gradient(samples):
        grads = []
        for s in samples:
            grey, m = s["image"].float().mean(0), s["mask"]
            inside = (m[:, 1:] == FOREST) & (m[:, :-1] == FOREST)
            grads.append((grey[:, 1:] - grey[:, :-1]).abs()[inside])
        return torch.cat(grads).mean().item()

    assert forest_gradient(domains["urban"]) > 1.5 * forest_gradient(domains["rural"])


def test_irrg_makes_vegetation_nir_bright():
    rgb = [SyntheticAerial("urban", "val", 8, 128, seed=0, sensor="rgb")[i] for i in range(8)]
    irrg = [SyntheticAerial("urban", "val", 8, 128, seed=0, sensor="irrg")[i] for i in range(8)]
    for a, b in zip(rgb, irrg, strict=True):
        assert torch.equal(a["mask"], b["mask"])  # same scene, another sensor

    def band_means(samples, cls):
        px = torch.cat([s["image"].float()[:, s["mask"] == cls] for s in samples], dim=1)
        return px.mean(1)

    veg_rgb, veg_irrg = band_means(rgb, FOREST), band_means(irrg, FOREST)
    assert veg_rgb[1] > veg_rgb[0]  # RGB: vegetation is green (G > R)
    assert veg_irrg[0] > veg_irrg[1] + 40  # IRRG: channel 0 is NIR, vegetation is bright red
    road_irrg, water_irrg = band_means(irrg, ROAD), band_means(irrg, WATER)
    assert veg_irrg[0] > road_irrg[0] + 40 and water_irrg[0] < road_irrg[0]  # NIR: vegetation ≫ road > water


def test_write_synthetic_loveda_round_trips_through_the_loader(tmp_path):
    write_synthetic_loveda(tmp_path, num_tiles=2, tile_size=32, seed=5, sensor="irrg")
    for split in ("train", "val"):
        for domain in ("rural", "urban"):
            loaded = LoveDA(tmp_path, split, domain)  # type: ignore[arg-type]
            ref = SyntheticAerial(domain, split, 2, 32, 5, "irrg" if domain == "urban" else "rgb")  # type: ignore[arg-type]
            assert len(loaded) == 2
            for i in range(2):
                assert torch.equal(loaded[i]["mask"], ref[i]["mask"])
                assert torch.equal(loaded[i]["image"], ref[i]["image"])
    test = LoveDA(tmp_path, "test", "urban")
    assert not (tmp_path / "Test" / "Urban" / "masks_png").exists()
    assert bool((test[0]["mask"] == 255).all())
    ids = sorted(int(p.stem) for p in tmp_path.rglob("*.png") if p.parent.name == "images_png")
    assert ids == list(range(12))  # unique ids across splits and domains


# ------------------------------------------------------------------------------ controllable shift
SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _class_colours(ds: SyntheticAerial) -> np.ndarray:
    """Mean colour [7, 3] of each class's pixels over every tile of `ds`."""
    sums, counts = np.zeros((7, 3)), np.zeros(7)
    for i in range(len(ds)):
        s = ds[i]
        img, m = s["image"].numpy().reshape(3, -1).astype(np.float64), s["mask"].numpy().reshape(-1)
        for c in range(7):
            sums[c] += img[:, m == c].sum(1)
            counts[c] += (m == c).sum()
    return sums / np.maximum(counts, 1)[:, None]


def test_full_shift_is_the_unshifted_domain_exactly():
    plain = SyntheticAerial("urban", "train", 3, 48, seed=2, sensor="irrg")
    shifted = SyntheticAerial("urban", "train", 3, 48, seed=2, sensor="irrg", shift=1.0, shift_from="rural")
    for i in range(3):
        assert torch.equal(plain[i]["image"], shifted[i]["image"]) and torch.equal(plain[i]["mask"], shifted[i]["mask"])


def test_zero_shift_has_the_source_statistics():
    """Strength 0: the target tiles are new tiles, but with the source's layouts, class frequencies and colours."""
    n, size = 24, 64
    rural = SyntheticAerial("rural", "val", n, size, seed=0)
    zero = SyntheticAerial("urban", "val", n, size, seed=0, shift=0.0, shift_from="rural")
    urban = SyntheticAerial("urban", "val", n, size, seed=0)
    assert not torch.equal(rural[0]["image"], zero[0]["image"])  # other tiles ...
    f_rural, f_zero, f_urban = (_fractions(list(d)) for d in (rural, zero, urban))
    assert np.abs(f_zero - f_rural).sum() < 0.25 * np.abs(f_urban - f_rural).sum()  # ... the source's classes
    c_rural, c_zero, c_urban = (_class_colours(d) for d in (rural, zero, urban))
    assert np.abs(c_zero - c_rural).mean() < 0.25 * np.abs(c_urban - c_rural).mean()  # ... and colours


def test_shift_moves_monotonically_from_source_to_target():
    n, size = 24, 64
    rural = _class_colours(SyntheticAerial("rural", "val", n, size, seed=0))
    distances, urban_layouts = [], []
    for s in SHIFTS:
        ds = SyntheticAerial("urban", "val", n, size, seed=0, shift=s, shift_from="rural")
        distances.append(np.abs(_class_colours(ds) - rural).mean())
        # urban layouts are the tiles with a road grid: many building pixels
        urban_layouts.append({i for i in range(n) if (ds[i]["mask"] == BUILDING).float().mean() > 0.12})
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    # each tile keeps its own layout coin: the set of urban-layout tiles only grows with the strength
    assert all(a <= b for a, b in zip(urban_layouts, urban_layouts[1:], strict=False))
    assert not urban_layouts[0] and len(urban_layouts[-1]) > 0.6 * n


def test_blend_styles_interpolates_every_parameter():
    from lpcgma.data.synthetic import _STYLES, blend_styles

    a, b = _STYLES["rural"], _STYLES["urban"]
    assert blend_styles(a, b, 0.0) == a and blend_styles(a, b, 1.0) == b
    mid = blend_styles(a, b, 0.25)
    assert np.allclose(mid.reflectance, 0.75 * np.asarray(a.reflectance) + 0.25 * np.asarray(b.reflectance))
    assert np.allclose(mid.gain, 0.75 * np.asarray(a.gain) + 0.25 * np.asarray(b.gain))
    assert mid.noise == pytest.approx(0.75 * a.noise + 0.25 * b.noise)
    for layers, ta, tb in zip(mid.textures, a.textures, b.textures, strict=True):
        assert [t.amplitude for t in layers] == pytest.approx(
            [0.75 * t.amplitude for t in ta] + [0.25 * t.amplitude for t in tb]
        )
    assert [v.prob for v in mid.variants] == pytest.approx(
        [0.75 * v.prob for v in a.variants] + [0.25 * v.prob for v in b.variants]
    )
    with pytest.raises(ValueError, match="0 <= s <= 1"):
        blend_styles(a, b, 1.5)


def test_shift_arguments_are_checked():
    with pytest.raises(ValueError, match="shift"):
        SyntheticAerial("urban", "train", shift=1.2, shift_from="rural")
    with pytest.raises(ValueError, match="shift_from"):
        SyntheticAerial("urban", "train", shift=0.5, shift_from="desert")  # type: ignore[arg-type]


def test_write_synthetic_loveda_writes_the_shifted_target(tmp_path):
    write_synthetic_loveda(tmp_path, num_tiles=2, tile_size=32, seed=5, sensor="rgb", shift=0.4)
    loaded = LoveDA(tmp_path, "val", "urban")
    ref = SyntheticAerial("urban", "val", 2, 32, 5, "rgb", shift=0.4, shift_from="rural")
    for i in range(2):
        assert torch.equal(loaded[i]["image"], ref[i]["image"]) and torch.equal(loaded[i]["mask"], ref[i]["mask"])


def _nearest_source_class(target: SyntheticAerial, rural: np.ndarray) -> list[int]:
    colours = _class_colours(target)
    return np.linalg.norm(colours[:, None] - rural[None], axis=2).argmin(axis=1).tolist()


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_source_palette_keeps_every_class_nearest_its_own_source_class(shift: float) -> None:
    """The target's own materials paint building in barren's colours (the aliasing RESULTS.md
    measured); the source palette keeps each target class nearest its own source class."""
    n, size = 24, 64
    rural = _class_colours(SyntheticAerial("rural", "train", n, size, seed=0))
    own = SyntheticAerial("urban", "train", n, size, seed=0, shift=shift, shift_from="rural")
    shared = SyntheticAerial("urban", "train", n, size, seed=0, shift=shift, shift_from="rural", palette="source")
    assert _nearest_source_class(own, rural)[BUILDING] == BARREN
    assert _nearest_source_class(shared, rural) == list(range(7))
    for i in (0, 5):  # same layouts and masks: only the materials change
        assert torch.equal(own[i]["mask"], shared[i]["mask"]) and not torch.equal(own[i]["image"], shared[i]["image"])


def test_palette_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="palette"):
        SyntheticAerial("urban", "train", palette="mars")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs shift_from"):
        SyntheticAerial("urban", "train", palette="source")


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_source_layouts_keep_every_tile_in_the_source_layout_and_shift_the_look_alone(shift: float) -> None:
    n, size = 24, 64
    shifted = SyntheticAerial("urban", "val", n, size, seed=0, shift=shift, shift_from="rural")
    looks = SyntheticAerial("urban", "val", n, size, seed=0, shift=shift, shift_from="rural", layouts="source")
    zero = SyntheticAerial("urban", "val", n, size, seed=0, shift=0.0, shift_from="rural")
    for i in range(n):  # the masks (layouts) of strength 0, whatever the strength
        assert torch.equal(looks[i]["mask"], zero[i]["mask"])
    assert any(not torch.equal(looks[i]["mask"], shifted[i]["mask"]) for i in range(n))  # shifted: urban layouts
    assert not any((looks[i]["mask"] == BUILDING).float().mean() > 0.12 for i in range(n))  # no road grid
    rural = _class_colours(SyntheticAerial("rural", "val", n, size, seed=0))
    # the look moves as far from the source as with shifted layouts
    moved, moved_shifted = (np.abs(_class_colours(d) - rural).mean() for d in (looks, shifted))
    assert moved > 0.5 * moved_shifted > 0


def test_layouts_arguments_are_checked_and_written(tmp_path) -> None:
    with pytest.raises(ValueError, match="layouts"):
        SyntheticAerial("urban", "train", layouts="city")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs shift_from"):
        SyntheticAerial("urban", "train", layouts="source")
    write_synthetic_loveda(tmp_path, num_tiles=2, tile_size=32, seed=5, sensor="rgb", shift=0.7, layouts="source")
    loaded = LoveDA(tmp_path, "val", "urban")
    ref = SyntheticAerial("urban", "val", 2, 32, 5, "rgb", shift=0.7, shift_from="rural", layouts="source")
    for i in range(2):
        assert torch.equal(loaded[i]["image"], ref[i]["image"]) and torch.equal(loaded[i]["mask"], ref[i]["mask"])


def _class_roughness(ds: SyntheticAerial) -> np.ndarray:
    """Mean |Laplacian| of the grey image [7] inside each class's regions (pixels whose 4 neighbours
    share their class): how fine a class's texture is, the cue that separates barren's speckle."""
    sums, counts = np.zeros(7), np.zeros(7)
    for i in range(len(ds)):
        s = ds[i]
        img, m = s["image"].float().mean(0).numpy(), s["mask"].numpy()
        centre = m[1:-1, 1:-1]
        lap = np.abs(4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:])
        inside = (centre == m[:-2, 1:-1]) & (centre == m[2:, 1:-1]) & (centre == m[1:-1, :-2]) & (centre == m[1:-1, 2:])
        for c in range(7):
            sums[c] += lap[inside & (centre == c)].sum()
            counts[c] += (inside & (centre == c)).sum()
    return sums / np.maximum(counts, 1)


def test_distinct_textures_keep_every_target_class_nearer_its_own_source_texture_than_barrens() -> None:
    """The own urban textures give agriculture and background a roughness nearer rural barren's speckle
    than their own rural class's (what the source model misreads: module doc); distinct ones do not."""
    n, size = 12, 64
    rural = np.log(_class_roughness(SyntheticAerial("rural", "train", n, size, seed=0)))

    def imitates_barren(textures: str) -> set[int]:
        ds = SyntheticAerial(
            "urban", "train", n, size, seed=0, shift=1.0, shift_from="rural", palette="source", layouts="source",
            textures=textures,  # type: ignore[arg-type]
        )  # fmt: skip
        target = np.log(_class_roughness(ds))
        return {c for c in range(7) if c != BARREN and abs(target[c] - rural[BARREN]) < abs(target[c] - rural[c])}

    assert imitates_barren("own") == {BACKGROUND, AGRICULTURE}
    assert imitates_barren("distinct") == set()


def test_textures_argument_is_checked_changes_the_look_only_and_is_written(tmp_path) -> None:
    with pytest.raises(ValueError, match="textures"):
        SyntheticAerial("urban", "train", textures="velvet")  # type: ignore[arg-type]
    own = SyntheticAerial("urban", "val", 3, 48, seed=1, shift=0.8, shift_from="rural")
    distinct = SyntheticAerial("urban", "val", 3, 48, seed=1, shift=0.8, shift_from="rural", textures="distinct")
    for i in range(3):  # same layouts; the image changes
        assert torch.equal(own[i]["mask"], distinct[i]["mask"])
        assert not torch.equal(own[i]["image"], distinct[i]["image"])
    rural = SyntheticAerial("rural", "val", 2, 48, seed=1)  # the source domain never changes
    also_rural = SyntheticAerial("rural", "val", 2, 48, seed=1, textures="distinct")
    assert torch.equal(rural[0]["image"], also_rural[0]["image"])
    write_synthetic_loveda(tmp_path, num_tiles=2, tile_size=32, seed=5, sensor="rgb", shift=0.7, textures="distinct")
    loaded = LoveDA(tmp_path, "val", "urban")
    ref = SyntheticAerial("urban", "val", 2, 32, 5, "rgb", shift=0.7, shift_from="rural", textures="distinct")
    for i in range(2):
        assert torch.equal(loaded[i]["image"], ref[i]["image"]) and torch.equal(loaded[i]["mask"], ref[i]["mask"])
