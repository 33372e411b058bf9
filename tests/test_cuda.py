"""On a CUDA device: every computation agrees with the CPU's (float64), and both
estimators fit, score, sample, save, load and resume with ``device="cuda"``.

Skipped on a machine without CUDA (CI's). The README's "GPU" section names the machine
and the commit they last ran on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import vmonf.training
from competitive import CompetitiveMixture
from vmonf import VMoNF
from vmonf.coupling import plain_autograd
from vmonf.flows import ComponentFlows
from vmonf.mixture import MixtureOfFlows
from vmonf.model import VariationalMixture
from vmonf.posterior import PosteriorNet
from vmonf.pyro_model import pyro_elbo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
TIGHT = dict(atol=1e-10, rtol=1e-10)
FLOW_CONFIGS = [
    dict(n_features=2, n_layers=3),
    dict(n_features=3, n_layers=3, activation="silu"),  # index-permutation splits
    dict(n_features=2, n_layers=2, activation="tanh", actnorm=True, linear=True),
    dict(n_features=4, n_layers=4, activation="elu", base_df=5.0),
]
FLOW_IDS = ["2d-relu", "3d-silu", "2d-tanh-actnorm-linear", "4d-elu-student-t"]
VMONF_FAST = dict(
    max_epochs=6, n_layers=2, hidden_features=16, init_steps=100, posterior_hidden=(8,),
    batch_size=64, learning_rate=5e-3,
)  # fmt: skip
COMPETITIVE_FAST = dict(
    n_layers=2, hidden_features=16, pretrain_epochs=2, max_epochs=2, max_rounds=3,
    batch_size=128, learning_rate=5e-3,
)  # fmt: skip


def blobs(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    means = np.array([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    return means[y] + rng.normal(size=(n, 2)), y


def random_flows(config: dict, n_components: int = 3) -> ComponentFlows:
    """float64 flows on the CPU with every parameter drawn at random (zero-initialised
    last layers would hide half the computation); ActNorm marked initialised."""
    flows = ComponentFlows(n_components=n_components, hidden_features=8, **config).double()
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0.0, 0.4)
        for name, buffer in flows.named_buffers():
            if name.endswith("initialized"):
                buffer.fill_(True)
    return flows


def gradients(flows: ComponentFlows, x: torch.Tensor) -> list[torch.Tensor]:
    """d(weighted sum of log p_k(x))/d(x and every parameter)."""
    x = x.clone().requires_grad_()
    log_prob = flows.log_prob(x)
    weights = torch.linspace(0.5, 1.5, log_prob.numel(), dtype=x.dtype, device=x.device)
    total = (log_prob.flatten() * weights).sum()
    return list(torch.autograd.grad(total, [x, *flows.parameters()]))


@pytest.mark.parametrize("config", FLOW_CONFIGS, ids=FLOW_IDS)
def test_flows_on_cuda_compute_what_they_compute_on_the_cpu(config):
    cpu = random_flows(config)
    gpu = random_flows(config).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(257, cpu.n_features, dtype=torch.float64)
    z, logdet = cpu(x)
    z_gpu, logdet_gpu = gpu(x.to(CUDA))
    torch.testing.assert_close(z_gpu.cpu(), z, **TIGHT)
    torch.testing.assert_close(logdet_gpu.cpu(), logdet, **TIGHT)
    back, inverse_logdet = gpu.inverse(z_gpu)
    torch.testing.assert_close(back, x.to(CUDA).expand_as(back), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(inverse_logdet, -logdet_gpu, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gpu.log_prob(x.to(CUDA)).cpu(), cpu.log_prob(x), **TIGHT)
    for g_gpu, g_cpu in zip(gradients(gpu, x.to(CUDA)), gradients(cpu, x), strict=True):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, **TIGHT)


@pytest.mark.parametrize("config", FLOW_CONFIGS, ids=FLOW_IDS)
def test_hand_written_backward_on_cuda_equals_plain_autograd(config):
    flows = random_flows(config).to(CUDA)
    x = torch.randn(65, flows.n_features, dtype=torch.float64, device=CUDA)
    fused = gradients(flows, x)
    with plain_autograd():
        plain = gradients(flows, x)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_log_det_on_cuda_equals_the_autograd_jacobian():
    flows = random_flows(dict(n_features=3, n_layers=3, actnorm=True, linear=True)).to(CUDA)
    x = torch.randn(4, 3, dtype=torch.float64, device=CUDA)
    _, logdet = flows(x)
    with plain_autograd():
        for n in range(x.shape[0]):
            jacobian = torch.autograd.functional.jacobian(lambda v: flows(v[None])[0][:, 0], x[n])
            torch.testing.assert_close(torch.linalg.slogdet(jacobian)[1], logdet[:, n], **TIGHT)


def test_points_that_are_not_finite_on_cuda():
    """On a GPU the masking always runs (the CPU skips it when every point is finite)."""
    mixture = MixtureOfFlows(random_flows(dict(n_features=2, n_layers=3))).to(CUDA)
    x = torch.randn(6, 2, dtype=torch.float64, device=CUDA)
    x[1, 0], x[4, 1] = torch.inf, torch.nan
    x.requires_grad_()
    log_prob = mixture.log_prob(x)
    assert log_prob[1].item() == -torch.inf and torch.isnan(log_prob[4])
    finite = [0, 2, 3, 5]
    with torch.no_grad():
        torch.testing.assert_close(log_prob[finite], mixture.log_prob(x[finite]), **TIGHT)
    grads = torch.autograd.grad(log_prob[finite].sum(), [x, *mixture.parameters()])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert torch.isnan(mixture.posterior(x.detach())[4]).all()


def test_sampling_on_cuda_follows_a_cuda_generator():
    flows = random_flows(dict(n_features=2, n_layers=3)).to(CUDA)
    mixture = MixtureOfFlows(flows)

    def draw() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator(CUDA).manual_seed(3)
        x, c = mixture.sample(500, generator=generator)
        return x, c, flows.sample(200, component=1, generator=generator)

    (x, c, one), (x2, c2, one2) = draw(), draw()
    assert x.device.type == c.device.type == one.device.type == "cuda"
    assert x.shape == (500, 2) and one.shape == (200, 2)
    assert torch.equal(x, x2) and torch.equal(c, c2) and torch.equal(one, one2)
    # flow 1 alone: its inverse of the same noise, run with all K flows
    generator = torch.Generator(CUDA).manual_seed(5)
    z = torch.randn(200, 2, dtype=torch.float64, device=CUDA, generator=generator)
    one = flows.sample(200, component=1, generator=torch.Generator(CUDA).manual_seed(5))
    torch.testing.assert_close(one, flows.inverse(z)[0][1], **TIGHT)


def test_pyro_oracle_on_cuda_equals_the_exact_elbo():
    """Pyro's TraceEnum_ELBO, run on the GPU, against the model's own ELBO (and its
    gradients)."""
    flows = random_flows(dict(n_features=2, n_layers=2))
    vm = VariationalMixture(MixtureOfFlows(flows, "learned"), PosteriorNet(2, 3, (8,)))
    with torch.no_grad():
        for p in vm.parameters():
            p.normal_(0.0, 0.3)
    vm = vm.double().to(CUDA)
    x = torch.randn(40, 2, dtype=torch.float64, device=CUDA)
    with pyro.get_param_store().scope():
        theirs = pyro_elbo(vm, x, 0.7)
    ours = vm.elbo(x, 0.7).mean()
    torch.testing.assert_close(theirs, ours, atol=1e-8, rtol=1e-8)
    params = list(vm.parameters())
    for a, b in zip(torch.autograd.grad(theirs, params), torch.autograd.grad(ours, params),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------- estimators


@pytest.fixture(scope="module")
def fitted_on_cuda() -> tuple[VMoNF, np.ndarray, np.ndarray]:
    X, y = blobs()
    return VMoNF(3, device="cuda", random_state=0, **VMONF_FAST).fit(X), X, y


def test_vmonf_fits_and_predicts_on_cuda(fitted_on_cuda):
    model, X, y = fitted_on_cuda
    assert all(p.device.type == "cuda" for p in model.model_.parameters())
    assert adjusted_rand_score(y, model.predict(X)) > 0.95
    scores = model.score_samples(X)
    assert scores.dtype == np.float64 and np.isfinite(scores).all()
    assert model.predict_proba(X).shape == (600, 3)
    samples, components = model.sample(300)
    assert isinstance(samples, np.ndarray) and samples.shape == (300, 2)
    assert set(np.unique(components)) <= {0, 1, 2}
    assert np.isfinite(model.elbo(X)).all()


def test_vmonf_fit_on_cuda_is_reproducible(fitted_on_cuda):
    model, X, _ = fitted_on_cuda
    again = VMoNF(3, device="cuda", random_state=0, **VMONF_FAST).fit(X)
    np.testing.assert_array_equal(again.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(again.sample(50, random_state=1)[0],
                                  model.sample(50, random_state=1)[0])  # fmt: skip


def test_a_model_fitted_on_cuda_loads_on_either_device(fitted_on_cuda, tmp_path):
    model, X, _ = fitted_on_cuda
    path = tmp_path / "model.pt"
    model.save(path)
    on_cpu = VMoNF.load(path, device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.model_.parameters())
    np.testing.assert_allclose(on_cpu.score_samples(X), model.score_samples(X), atol=1e-4)
    on_gpu = VMoNF.load(path)
    assert all(p.device.type == "cuda" for p in on_gpu.model_.parameters())
    np.testing.assert_array_equal(on_gpu.score_samples(X), model.score_samples(X))


def test_scoring_on_cuda_streams_in_chunks(fitted_on_cuda, monkeypatch):
    """Scoring on the GPU in its chunks equals scoring in one piece, and the GPU's memory
    holds one chunk's temporaries, not all of them."""
    model, _, _ = fitted_on_cuda
    n = 4 * vmonf.training.GPU_EVAL_CHUNK
    X = np.random.default_rng(1).normal(size=(n, 2)) * 4

    def peak_while(call: Callable[[], np.ndarray]) -> tuple[np.ndarray, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = call()
        return out, torch.cuda.max_memory_allocated() - before

    chunked, chunked_peak = peak_while(lambda: model.score_samples(X))
    monkeypatch.setattr(vmonf.training, "GPU_EVAL_CHUNK", n)
    whole, whole_peak = peak_while(lambda: model.score_samples(X))
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=1e-5)
    assert chunked_peak < 0.6 * whole_peak


def test_semi_supervised_vmonf_on_cuda():
    X, y = blobs()
    labels = np.where(np.random.default_rng(0).random(600) < 0.1, y, -1)
    model = VMoNF(3, device="cuda", random_state=0, **VMONF_FAST).fit(X, labels)
    assert adjusted_rand_score(y, model.predict(X)) > 0.95
    known = labels >= 0
    assert (model.predict(X)[known] == labels[known]).mean() > 0.95


def test_vmonf_resumes_on_cuda(tmp_path):
    """The CUDA generator's state travels in the checkpoint."""
    X, _ = blobs(300)
    params = dict(VMONF_FAST, device="cuda", random_state=0, dtype="float64")
    reference = VMoNF(3, **params).fit(X)
    calls = []

    def stop(estimator, epoch) -> None:
        calls.append(epoch)
        if len(calls) == 3:
            raise KeyError("stop")

    path = tmp_path / "state.pt"
    with pytest.raises(KeyError, match="stop"):
        VMoNF(3, **params, checkpoint=path, checkpoint_every=5, callback=stop).fit(X)
    resumed = VMoNF(3, **params, checkpoint=path, checkpoint_every=5).fit(X, resume=True)
    np.testing.assert_allclose(resumed.score_samples(X), reference.score_samples(X), atol=1e-8)


@pytest.mark.xfail(
    torch.__version__ < "2.13",
    reason="torch 2.11+cu130's inductor (the H100 image's) asserted a saved tensor's stride "
    "at the first partial batch: expected (64, 0, 1) for shape (3, 1, 44); fine on the CPU",
    strict=False,
)
def test_compiled_vmonf_fits_on_cuda():
    X, y = blobs(300)
    model = VMoNF(3, device="cuda", compile=True, random_state=0, **VMONF_FAST).fit(X)
    assert np.isfinite(model.score_samples(X)).all()
    assert adjusted_rand_score(y, model.predict(X)) > 0.9


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 3 rounds
@pytest.mark.parametrize("assignment", ["exact", "discriminator"])
def test_competitive_fits_on_cuda(assignment):
    X, y = blobs()
    model = CompetitiveMixture(
        3, assignment=assignment, init="kmeans", device="cuda", random_state=0,
        **COMPETITIVE_FAST,
    ).fit(X)  # fmt: skip
    assert all(p.device.type == "cuda" for p in model.model_.parameters())
    assert adjusted_rand_score(y, model.predict(X)) > 0.9
    assert np.isfinite(model.score_samples(X)).all()
    assert model.sample(100)[0].shape == (100, 2)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_competitive_vae_generators_fit_on_cuda():
    X, _ = blobs(300)
    model = CompetitiveMixture(
        3, generator="vae", init="kmeans", device="cuda", random_state=0, **COMPETITIVE_FAST
    ).fit(X)
    assert np.isfinite(model.elbo(X)).all()  # a VAE has no exact likelihood
    assert model.sample(100)[0].shape == (100, 2)
