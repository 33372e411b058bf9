"""Contract tests for the speed work (issue 6): the hand-written backward passes, the
competitive regrouping, chunked scoring and sampling, ``compile=True`` and the
malloc thresholds.

Numbers about speed come only from ``benchmarks/speed.py``; these tests check that
every fast path computes exactly what the plain one does (float64).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vmonf.base
import vmonf.coupling
import vmonf.flows
import vmonf.training
from competitive import CompetitiveMixture
from competitive.discriminators import Discriminators
from competitive.generators import FlowGenerators, VAEGenerators
from vmonf import VMoNF, datasets
from vmonf.coupling import (
    ACTIVATIONS,
    NARROW,
    AffineCoupling,
    BatchedMLP,
    bounded_log_scale,
    plain_autograd,
)
from vmonf.flows import ComponentFlows, group_by_component, rank_within_groups
from vmonf.heap import _glibc, retain_freed_memory
from vmonf.training import TrainConfig, train

# --------------------------------------------------------------------------- batched MLP


def _layer_by_layer(mlp: BatchedMLP, x: torch.Tensor) -> torch.Tensor:
    """The plain autograd reference: baddbmm and the activation module, layer by layer."""
    h = x
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases, strict=True)):
        h = torch.baddbmm(b, h, w)
        if i < len(mlp.weights) - 1:
            h = mlp.activation(h)
    return h


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize(
    ("n_in", "n_out", "hidden", "layers"),
    [(1, 2, 16, 2), (3, 6, 12, 1), (4, 20, NARROW, 2), (2, 2, 5, 0)],
    ids=["outer-product-in", "narrow-out", "narrow-hidden", "no-hidden"],
)
def test_stacked_mlp_equals_layer_by_layer_autograd(activation, n_in, n_out, hidden, layers):
    mlp = BatchedMLP(3, n_in, n_out, hidden, layers, activation, zero_last=False)
    x = torch.randn(3, 11, n_in, requires_grad=True)
    out, ref = mlp(x), _layer_by_layer(mlp, x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    weights = torch.randn_like(ref)
    inputs = [x, *mlp.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * weights).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "silu"])
def test_stacked_mlp_passes_gradcheck_and_gradgradcheck(activation):
    """Second derivatives were silently wrong: the hand-written backward was marked
    once-differentiable, and torch.autograd.functional.hessian read that as zeros."""
    mlp = BatchedMLP(2, 1, 2, 6, 2, activation, zero_last=False)
    x = torch.randn(2, 5, 1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: mlp(v), (x,))
    names = [name for name, _ in mlp.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in mlp.parameters())

    def forward(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mlp, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradgradcheck(forward, (x, *params))


def test_affine_coupling_forward_passes_gradcheck():
    coupling = AffineCoupling(2, torch.tensor([1, 0, 1]), hidden_features=6, max_log_scale=2.0)
    with torch.no_grad():
        for p in coupling.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 4, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: coupling(v), (x,))
    # and equals the plain formula
    z, logabsdet = coupling(x)
    shift, raw = coupling.conditioner(x[..., [1]]).chunk(2, dim=-1)
    log_scale = bounded_log_scale(raw, 2.0)
    torch.testing.assert_close(z[..., [0, 2]], x[..., [0, 2]] * log_scale.exp() + shift)
    torch.testing.assert_close(logabsdet, log_scale.sum(-1))


@pytest.mark.parametrize(
    "config",
    [
        dict(n_features=2, n_layers=3),
        dict(n_features=3, n_layers=3, activation="silu"),  # index-permutation splits
        dict(n_features=2, n_layers=2, actnorm=True, linear=True),  # runs of one coupling
    ],
    ids=["2d", "3d-silu", "2d-actnorm-linear"],
)
def test_coupling_stack_passes_gradcheck_in_inputs_and_parameters(config):
    flows = ComponentFlows(n_components=2, hidden_features=5, **config).eval()  # no ActNorm init
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0.0, 0.4)
    names = [name for name, _ in flows.named_parameters()]
    x = torch.randn(2, 4, flows.n_features, requires_grad=True)

    def forward(x: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(flows, dict(zip(names, params, strict=True)), (x,))

    params = tuple(p.detach().clone().requires_grad_() for p in flows.parameters())
    assert torch.autograd.gradcheck(forward, (x, *params))
    # Training's case: data that needs no gradient, so the first coupling skips its input
    # gradient while the later ones must still pass theirs down.
    data = x.detach()
    assert torch.autograd.gradcheck(lambda *params: forward(data, *params), params)
    with torch.no_grad():  # the path that keeps nothing for a backward agrees
        torch.testing.assert_close(flows(x), forward(x, *params))
    # Second derivatives (create_graph=True) differentiate a plain recomputation.
    assert torch.autograd.gradgradcheck(forward, (x, *params))


def test_hessians_and_torch_func_transforms_of_the_density():
    """A Hessian of log p(x) came out as zeros, and torch.func transforms raised."""
    flows = ComponentFlows(n_components=2, n_features=2, n_layers=3, hidden_features=8).double()
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0.0, 0.4)
    point = torch.randn(2, dtype=torch.float64)

    def log_p(u: torch.Tensor) -> torch.Tensor:
        return flows.log_prob(u[None])[0, 1]

    def gradient(u: torch.Tensor) -> torch.Tensor:
        u = u.clone().requires_grad_()
        return torch.autograd.grad(log_p(u), u)[0]

    hessian = torch.autograd.functional.hessian(log_p, point)
    eps, basis = 1e-6, torch.eye(2, dtype=torch.float64)
    differences = torch.stack([(gradient(point + eps * e) - gradient(point - eps * e)) / (2 * eps)
                               for e in basis])  # fmt: skip
    torch.testing.assert_close(hessian, differences, atol=1e-6, rtol=1e-6)
    with plain_autograd():  # torch.func needs the plain ops
        torch.testing.assert_close(torch.func.hessian(log_p)(point), hessian)
        points = torch.randn(5, 2, dtype=torch.float64)
        per_point = torch.func.vmap(torch.func.grad(log_p))(points)
    torch.testing.assert_close(per_point, torch.stack([gradient(u) for u in points]))


def test_a_gradient_penalty_reaches_every_discriminator_parameter():
    discriminators = Discriminators(2, 3, hidden_features=8).double()
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)

    def penalty() -> list[torch.Tensor]:
        (grad_x,) = torch.autograd.grad(discriminators(x).sum(), x, create_graph=True)
        params = list(discriminators.parameters())  # the output bias leaves grad_x alone
        return torch.autograd.grad(grad_x.square().sum(), params, materialize_grads=True)

    fused = penalty()
    with plain_autograd():
        plain = penalty()
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected)
    weights = [g for (name, _), g in zip(discriminators.named_parameters(), fused, strict=True)
               if "weight" in name]  # fmt: skip
    assert weights and all(bool(g.abs().sum() > 0) for g in weights)


def test_first_order_backward_keeps_the_hand_written_path(monkeypatch):
    def recompute(*args, **kwargs):
        raise AssertionError("plain recomputation in a first-order backward")

    monkeypatch.setattr(vmonf.coupling, "_differentiable_backward", recompute)
    flows = ComponentFlows(n_components=2, n_features=2, n_layers=2, hidden_features=8)
    flows.log_prob(torch.randn(7, 2)).sum().backward()  # the coupling stack
    discriminators = Discriminators(2, 2, hidden_features=8)  # a batched MLP
    discriminators(torch.randn(7, 2)).sum().backward()
    for module in (flows, discriminators):
        assert all(p.grad is not None for p in module.parameters())


def test_the_plain_autograd_switch_leaves_compiled_graphs_whole():
    """Reading its ContextVar broke the graph at every coupling stack and MLP."""
    flows = ComponentFlows(n_components=2, n_features=2, n_layers=2, hidden_features=8)
    discriminators = Discriminators(2, 2, hidden_features=8)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return flows.log_prob(x).sum() + discriminators(x).sum()

    x = torch.randn(7, 2)
    compiled = torch.compile(loss, fullgraph=True, backend="eager")  # fails on a break
    torch.testing.assert_close(compiled(x), loss(x))


# --------------------------------------------------------------------------- competitive


@pytest.mark.parametrize("kind", ["one_hot", "lent", "bootstrap", "empty_component"])
def test_grouped_objective_equals_the_masked_one(kind):
    n, k = 40, 3
    gens = FlowGenerators(2, k, n_layers=2, hidden_features=8)
    with torch.no_grad():
        for p in gens.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(n, 2)
    owners = torch.randint(0, k, (n,))
    if kind == "empty_component":
        owners = owners % 2
    weights = F.one_hot(owners, k).double()
    if kind == "lent":  # load balancing: a component also trains on others' points
        weights[:5, 2] = 1.0
    if kind == "bootstrap":
        weights = torch.randint(0, 3, (n, k)).double()
    index, slot_weights = group_by_component(weights)
    grouped = (slot_weights * gens.stacked_loss(x[index])).sum() / n
    masked = (weights * gens.per_point_loss(x)).sum(1).mean()
    torch.testing.assert_close(grouped, masked)
    params = list(gens.parameters())
    for g, g_ref in zip(
        torch.autograd.grad(grouped, params), torch.autograd.grad(masked, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref)
    assert index.shape[1] == int((weights > 0).sum(0).max())


def test_rank_within_groups():
    rank, counts = rank_within_groups(torch.tensor([2, 0, 2, 2, 0]), 4)
    assert rank.tolist() == [0, 0, 1, 2, 1]
    assert counts.tolist() == [2, 0, 3, 0]


# --------------------------------------------------------------------------- streaming


def test_chunked_sampling_draws_from_the_named_flow(monkeypatch):
    # Shifts of N(0, I) by -+10 (see test_flows); 7-point chunks force many chunks.
    monkeypatch.setattr(vmonf.flows, "SAMPLE_CHUNK", 7)
    flows = ComponentFlows(n_features=2, n_components=2, n_layers=2, hidden_features=4)
    with torch.no_grad():
        for layer in flows.layers:
            layer.conditioner.biases[-1][0, 0, 0] = -10.0
            layer.conditioner.biases[-1][1, 0, 0] = 10.0
    comps = torch.randint(0, 2, (50,))
    x = flows.sample_components(comps, generator=torch.Generator().manual_seed(0))
    assert x.shape == (50, 2)
    assert torch.all((x[:, 0] > 0) == (comps == 0))
    again = flows.sample_components(comps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, again)
    assert flows.sample_components(torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_vae_sample_components_streams(monkeypatch):
    monkeypatch.setattr(vmonf.flows, "SAMPLE_CHUNK", 4)
    vae = VAEGenerators(2, 3, hidden_features=8)
    comps = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 0])
    assert vae.sample_components(comps, torch.Generator().manual_seed(0)).shape == (9, 2)


def test_scores_do_not_depend_on_the_chunk_size(monkeypatch):
    X, _ = datasets.toy("pinwheel", n_classes=3).sample(300, seed=0)
    model = VMoNF(3, n_layers=2, max_epochs=1, init_steps=5, random_state=0).fit(X)
    whole = model.score_samples(X)
    monkeypatch.setattr(vmonf.training, "EVAL_CHUNK", 7)
    np.testing.assert_allclose(model.score_samples(X), whole, rtol=0, atol=1e-6)
    assert model.predict_proba(X).shape == (300, 3)


def test_evaluation_chunks_are_larger_on_a_gpu():
    """A GPU's chunk costs its kernel launches, not its memory traffic (benchmarks/gpu.py)."""
    assert vmonf.training.eval_chunk(torch.device("cpu")) == vmonf.training.EVAL_CHUNK == 4096
    assert vmonf.training.eval_chunk(torch.device("cuda")) == vmonf.training.GPU_EVAL_CHUNK
    assert vmonf.training.GPU_EVAL_CHUNK > vmonf.training.EVAL_CHUNK


# --------------------------------------------------------------------------- compile


def test_compile_must_be_a_bool():
    X = np.random.default_rng(0).normal(size=(20, 2))
    with pytest.raises(TypeError, match="compile"):
        VMoNF(2, compile="yes").fit(X)


def _compile_unavailable() -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile's inductor backend needs a C++ compiler on the PATH"
    return None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile
@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
def test_compile_true_fits_the_same_model():
    # float64: in float32 the compiled kernels round differently, and Adam's first steps
    # (about lr * sign(gradient)) turn that into weights 2e-3 apart where a gradient is ~0.
    X = np.random.default_rng(0).normal(size=(200, 2))
    small = dict(n_layers=1, hidden_features=4, posterior_hidden=(), init_steps=0)
    params = dict(max_epochs=2, batch_size=64, dtype="float64", random_state=0, **small)
    eager = VMoNF(2, **params).fit(X)
    compiled = VMoNF(2, compile=True, **params).fit(X)
    np.testing.assert_allclose(compiled.score_samples(X), eager.score_samples(X), atol=1e-8)
    comp = dict(n_layers=1, hidden_features=4, max_rounds=1, tol=0.9, pretrain_epochs=1)
    ref = CompetitiveMixture(2, max_epochs=1, random_state=0, dtype="float64", **comp).fit(X)
    fast = CompetitiveMixture(
        2, max_epochs=1, random_state=0, dtype="float64", compile=True, **comp
    ).fit(X)
    np.testing.assert_allclose(fast.score_samples(X), ref.score_samples(X), atol=1e-8)


# --------------------------------------------------------------------------- malloc


def test_train_applies_the_malloc_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(vmonf.training, "retain_freed_memory", lambda: calls.append(1))
    module = torch.nn.Linear(2, 1)
    x = torch.randn(16, 2)
    config = TrainConfig(max_epochs=1, batch_size=8)
    train(module, lambda b, _: module(b[0]).square().mean(), (x,), config,
          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert calls == [1]


@pytest.mark.parametrize("call", ["score_samples", "predict_proba", "sample"])
def test_scoring_and_sampling_apply_the_malloc_thresholds(monkeypatch, call):
    """Also in a process that only loads a model: its chunks reallocate their temporaries."""
    X = np.random.default_rng(0).normal(size=(40, 2))
    model = VMoNF(2, max_epochs=1, n_layers=2, hidden_features=4, init_steps=2).fit(X)
    calls = []
    monkeypatch.setattr(vmonf.base, "retain_freed_memory", lambda: calls.append(1))
    getattr(model, call)(X) if call != "sample" else model.sample(5, random_state=0)
    assert calls == [1]


def test_malloc_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("VMONF_MALLOC_TUNING", "0")
    retain_freed_memory.cache_clear()
    try:
        assert retain_freed_memory() is False
    finally:
        retain_freed_memory.cache_clear()


_STEP_FAULTS = """
import resource, sys, torch
from vmonf.flows import ComponentFlows
from vmonf.heap import retain_freed_memory
print(retain_freed_memory())
torch.manual_seed(0)
flows, x = ComponentFlows(2, 5, 8, 64), torch.randn(512, 2)
def step():
    z, logabsdet = flows(x)
    (z.square().sum() + logabsdet.sum()).backward()
for _ in range(5):
    step()
faults = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[10])
"""


@pytest.mark.skipif(_glibc() is None, reason="the malloc thresholds are glibc's")
def test_training_steps_reuse_their_memory_after_retain_freed_memory():
    # K = 5 flows of 64-wide couplings: 655 KB activations, freed and reallocated
    # every step (186-344 page faults per step with glibc's defaults, 1-25 without).
    # The median step is checked: this machine's kernel reclaims idle pages now and
    # then (kdamond), and one step in 20 may then fault 160-1700 times either way.
    env = {**os.environ, "VMONF_MALLOC_TUNING": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _STEP_FAULTS], check=True, capture_output=True, text=True,
        env=env, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    applied, median_faults = done.stdout.split()
    assert applied == "True"
    assert int(median_faults) < 60


_SCORE_FAULTS = """
import resource, sys, numpy as np
from vmonf import VMoNF
model = VMoNF.load(sys.argv[1])  # a process that never fits
X = np.random.default_rng(0).normal(size=(20_000, 2))
model.score_samples(X)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.score_samples(X)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2] / len(X))
"""


@pytest.mark.skipif(_glibc() is None, reason="the malloc thresholds are glibc's")
def test_scoring_a_loaded_model_reuses_its_memory(tmp_path):
    # K = 5 defaults: with glibc's own thresholds about one page fault per point scored
    # (10,000 per 10,000 points), with retain_freed_memory about 0.03.
    X = np.random.default_rng(0).normal(size=(300, 2))
    path = tmp_path / "model.pt"
    VMoNF(5, max_epochs=1, init_steps=2, random_state=0).fit(X).save(path)
    done = subprocess.run(
        [sys.executable, "-c", _SCORE_FAULTS, str(path)], check=True, capture_output=True,
        text=True, env={**os.environ, "VMONF_MALLOC_TUNING": "1"}, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert float(done.stdout.split()[-1]) < 0.2
