"""Molecule networks: E(3) equivariance, permutations, batching, zero CoM, the null property
vector, gradients, configs, graphs, and a short training run.

Every symmetry check runs in float64 on randomised parameters (so every gate, attention and
coordinate path carries signal) and compares to 1e-5."""
import json

import pytest
import torch
from multidiff.modalities.molecules.networks import (
    EGNN,
    ConfigError,
    EGNNConfig,
    GraphError,
    PropertyError,
    TensorFieldConfig,
    TensorFieldNetwork,
    build_network,
    drop_properties,
    fully_connected_edges,
    null_properties,
    radius_edges,
    remove_mean,
)

import multidiff as md
from multidiff.training.loss import DenoisingLoss

TOL = 1e-5
SIZES = (5, 1, 7, 3, 9)  # includes a lone atom (no edges) and an uneven batch
NUM_PROPS = 2

CONFIGS = {
    "egnn": EGNNConfig(num_properties=NUM_PROPS, hidden=16, num_layers=2, inv_sublayers=2),
    "egnn-sin": EGNNConfig(num_properties=NUM_PROPS, hidden=16, num_layers=2, sin_embedding=True),
    "egnn-radius": EGNNConfig(num_properties=NUM_PROPS, hidden=16, num_layers=2, radius=2.5),
    "tfn": TensorFieldConfig(
        num_properties=NUM_PROPS, irreps_hidden="8x0e + 2x0o + 4x1o + 2x1e + 2x2e", num_layers=2,
        radial_hidden=16, num_basis=8,
    ),
    "tfn-radius": TensorFieldConfig(
        num_properties=NUM_PROPS, irreps_hidden="8x0e + 4x1o", num_layers=2, radial_hidden=16, num_basis=8,
        radius=2.5,
    ),
}


def make(name, seed=0, std=0.3):
    """A float64 network whose parameters (including near-zero initialised ones) are all
    perturbed by ``std`` Gaussian noise."""
    torch.manual_seed(seed)
    net = build_network({"kind": "egnn" if name.startswith("egnn") else "tfn", **vars(CONFIGS[name])}).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def molecules(sizes=SIZES, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(len(batch), 9, generator=g, dtype=dtype)
    x[:, :3] *= 1.5
    t = torch.rand(len(sizes), generator=g, dtype=dtype)
    props = torch.randn(len(sizes), NUM_PROPS, generator=g, dtype=dtype)
    return x, t, batch, props


def random_orthogonal(det, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q


def item_mean(v, batch):
    return torch.zeros(int(batch.max()) + 1, v.shape[1], dtype=v.dtype).index_add_(0, batch, v) / torch.bincount(batch)[:, None]


NAMES = list(CONFIGS)


# -- symmetries ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("det", [1, -1])
def test_rotation_reflection_translation_equivariance(name, det):
    net = make(name)
    x, t, batch, props = molecules()
    out = net(x, t, batch=batch, properties=props)
    q = random_orthogonal(det, seed=3 + det)
    shift = 4.0 * torch.randn(len(SIZES), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x2 = x.clone()
    x2[:, :3] = x[:, :3] @ q.T + shift[batch]  # a different translation for every molecule
    out2 = net(x2, t, batch=batch, properties=props)
    assert out[:, :3].abs().max() > 1e-2 and out[:, 3:].abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(out2[:, :3], out[:, :3] @ q.T, atol=TOL, rtol=0)
    torch.testing.assert_close(out2[:, 3:], out[:, 3:], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_within_molecules_permutes_the_output(name):
    net = make(name)
    x, t, batch, props = molecules()
    g = torch.Generator().manual_seed(5)
    starts = torch.cumsum(torch.tensor(SIZES), 0) - torch.tensor(SIZES)
    perm = torch.cat([s + torch.randperm(n, generator=g) for s, n in zip(starts.tolist(), SIZES)])
    assert not torch.equal(perm, torch.arange(len(perm)))
    out = net(x, t, batch=batch, properties=props)
    out_p = net(x[perm], t, batch=batch, properties=props)
    torch.testing.assert_close(out_p, out[perm], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_each_molecule_alone(name):
    net = make(name)
    x, t, batch, props = molecules()
    out = net(x, t, batch=batch, properties=props)
    for b in range(len(SIZES)):
        m = batch == b
        alone = net(x[m], t[b:b + 1], batch=torch.zeros(int(m.sum()), dtype=torch.long), properties=props[b:b + 1])
        torch.testing.assert_close(alone, out[m], atol=TOL, rtol=0)
    lone = SIZES.index(1)  # a molecule with one atom has no edges: its vector output is 0
    assert out[batch == lone, :3].abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_position_output_has_zero_centre_of_mass(name):
    net = make(name)
    x, t, batch, props = molecules()
    x[:, :3] += 10.0  # far from the origin: the output must not care
    out = net(x, t, batch=batch, properties=props)
    assert item_mean(out[:, :3], batch).abs().max() < 1e-12


# -- properties ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["egnn", "tfn"])
def test_no_properties_is_the_learned_null_vector(name):
    net = make(name)
    x, t, batch, props = molecules()
    B = len(SIZES)
    none = net(x, t, batch=batch)
    null_rows = net(x, t, batch=batch, properties=null_properties(B, NUM_PROPS, dtype=x.dtype))
    explicit = net(x, t, batch=batch, properties=net.null_vector.detach().expand(B, NUM_PROPS).clone())
    torch.testing.assert_close(none, null_rows, atol=0, rtol=0)
    torch.testing.assert_close(none, explicit, atol=1e-12, rtol=0)
    cond = net(x, t, batch=batch, properties=props)
    assert (cond - none).abs().max() > 1e-3  # conditioning does something
    # a mixed batch: NaN rows are unconditional, the others conditional, item by item
    mixed = props.clone()
    mixed[1::2] = float("nan")
    out = net(x, t, batch=batch, properties=mixed)
    odd = (batch % 2) == 1
    torch.testing.assert_close(out[odd], none[odd], atol=TOL, rtol=0)
    torch.testing.assert_close(out[~odd], cond[~odd], atol=TOL, rtol=0)


def test_drop_properties():
    props = torch.randn(20000, 3)
    g = torch.Generator().manual_seed(0)
    dropped = drop_properties(props, 0.3, g)
    is_null = torch.isnan(dropped).all(1)
    assert torch.isnan(dropped).any(1).eq(is_null).all()  # whole rows only
    assert abs(is_null.double().mean().item() - 0.3) < 0.015  # 5 sigma of a binomial mean
    torch.testing.assert_close(dropped[~is_null], props[~is_null], atol=0, rtol=0)
    again = drop_properties(props, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.isnan(again), torch.isnan(dropped))
    assert drop_properties(props, 0.0) is props
    assert torch.isnan(drop_properties(props, 1.0)).all()
    net = EGNN(EGNNConfig(num_properties=3, property_dropout=1.0, hidden=8, num_layers=1))
    assert torch.isnan(net.drop_properties(props[:4], g)).all()
    net.eval()
    assert net.drop_properties(props[:4], g) is not None and not torch.isnan(net.drop_properties(props[:4], g)).any()
    with pytest.raises(ValueError, match="probability"):
        drop_properties(props, 1.5)


def test_bad_properties_and_inputs_are_named():
    net = make("egnn")
    x, t, batch, props = molecules()
    bad = props.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(PropertyError, match="molecule 2 are partly NaN"):
        net(x, t, batch=batch, properties=bad)
    with pytest.raises(PropertyError, match=r"shape \[5, 2\]"):
        net(x, t, batch=batch, properties=props[:, :1])
    uncond = EGNN(EGNNConfig(hidden=8, num_layers=1)).double()
    with pytest.raises(PropertyError, match="unconditional"):
        uncond(x, t, batch=batch, properties=props)
    with pytest.raises(ValueError, match=r"\[N, 9\]"):
        net(x[:, :8], t, batch=batch)
    with pytest.raises(GraphError, match="sorted"):
        net(x, t, batch=batch.flip(0))
    with pytest.raises(GraphError, match="no nodes"):
        net(x, torch.rand(len(SIZES) + 1, dtype=x.dtype), batch=batch)


# -- gradients, dtypes, configs -------------------------------------------------------------
@pytest.mark.parametrize("name", ["egnn", "egnn-sin", "tfn"])
def test_gradient_reaches_every_parameter(name):
    net = make(name, std=0.02)  # large random weights saturate tanh/sigmoid to exact zeros
    x, t, batch, props = molecules()
    mixed = props.clone()
    mixed[0] = float("nan")  # one unconditional molecule: the null vector gets a gradient too
    out = net(x, t, batch=batch, properties=mixed)
    (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", ["egnn", "tfn"])
def test_float32_network_follows_the_input_dtype_and_matches_float64(name):
    net = make(name)
    x, t, batch, props = molecules()
    ref = net(x, t, batch=batch, properties=props)
    net32 = net.float()
    out = net32(x, t, batch=batch, properties=props)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert net32(x.float(), t.float(), batch=batch, properties=props.float()).dtype == torch.float32
    # a scalar t and no batch vector: one molecule at one time
    one = net(x[:5], 0.3)
    torch.testing.assert_close(one, net(x[:5], torch.tensor([0.3], dtype=torch.float64), batch=torch.zeros(5, dtype=torch.long)))


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_through_json(name):
    net = make(name)
    d = json.loads(json.dumps(net.config_dict()))
    rebuilt = build_network(d).double()
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.config == net.config and rebuilt.num_parameters() == net.num_parameters()
    x, t, batch, props = molecules()
    expected = net(x, t, batch=batch, properties=props)
    torch.testing.assert_close(rebuilt(x, t, batch=batch, properties=props), expected, atol=0, rtol=0)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown molecule network kind"):
        build_network({"kind": "painn"})
    with pytest.raises(ConfigError, match="unknown EGNNConfig field"):
        build_network({"kind": "egnn", "nf": 64})
    with pytest.raises(ConfigError, match="not a 'tfn'"):
        TensorFieldNetwork.from_config({"kind": "egnn"})
    with pytest.raises(ConfigError, match="needs a 1o"):
        TensorFieldConfig(irreps_hidden="16x0e + 4x1e")
    with pytest.raises(ConfigError, match="not an irreps string"):
        TensorFieldConfig(irreps_hidden="16 scalars")
    with pytest.raises(ConfigError, match="hidden"):
        EGNNConfig(hidden=0)
    with pytest.raises(ConfigError, match="radius"):
        EGNNConfig(radius=-1.0)


# -- graphs -------------------------------------------------------------------------------
def brute_force_edges(pos, batch, radius=None):
    pairs = []
    for i in range(len(batch)):
        for j in range(len(batch)):
            if i != j and batch[i] == batch[j] and (radius is None or torch.linalg.norm(pos[i] - pos[j]) < radius):
                pairs.append((j, i))
    return sorted(pairs)


def as_pairs(edges):
    return sorted(map(tuple, edges.T.tolist()))


def test_fully_connected_edges_match_brute_force():
    x, _, batch, _ = molecules()
    edges = fully_connected_edges(batch)
    assert edges.shape == (2, sum(n * (n - 1) for n in SIZES))
    assert as_pairs(edges) == brute_force_edges(x[:, :3], batch)
    assert len(set(as_pairs(edges))) == edges.shape[1]  # no duplicates


@pytest.mark.parametrize("radius", [0.8, 1.7, 3.0])
def test_radius_edges_match_brute_force_and_chunking(radius):
    x, _, batch, _ = molecules(sizes=(12, 2, 20, 1, 15), seed=3)
    pos = x[:, :3]
    edges = radius_edges(pos, batch, radius)
    expected = brute_force_edges(pos, batch, radius)
    assert 0 < len(expected) < sum(n * (n - 1) for n in (12, 2, 20, 1, 15))  # a real selection
    assert as_pairs(edges) == expected
    # tiny chunks (one item per chunk, and an item bigger than the budget) give the same graph
    assert torch.equal(radius_edges(pos, batch, radius, max_pairs=150), edges)
    assert torch.equal(radius_edges(pos, batch, radius, max_pairs=1), edges)


def test_large_radius_equals_fully_connected():
    x, _, batch, _ = molecules()
    assert torch.equal(radius_edges(x[:, :3], batch, 1e6), fully_connected_edges(batch))
    net_fc = make("egnn")
    cfg = {**net_fc.config_dict(), "radius": 1e6}
    net_r = build_network(cfg).double()
    net_r.load_state_dict(net_fc.state_dict())
    x, t, batch, props = molecules()
    # the cosine cutoff of a huge radius is 1 to within (pi d / r)^2 / 4
    expected = net_fc(x, t, batch=batch, properties=props)
    torch.testing.assert_close(net_r(x, t, batch=batch, properties=props), expected, atol=1e-8, rtol=1e-7)


def test_remove_mean():
    x, _, batch, _ = molecules()
    assert item_mean(remove_mean(x, batch, len(SIZES)), batch).abs().max() < 1e-14


# -- in the core: Denoiser, GraphSpace, loss, a short training run -------------------------
@pytest.mark.parametrize("name", ["egnn", "tfn"])
def test_thirty_training_steps_lower_the_eps_loss(name):
    torch.manual_seed(0)
    config = EGNNConfig(hidden=32, num_layers=2) if name == "egnn" else TensorFieldConfig(
        irreps_hidden="16x0e + 4x1o", num_layers=2, radial_hidden=32, num_basis=8)
    net = build_network({"kind": name, **vars(config)})
    sizes = (6, 9, 4, 8)
    space = md.GraphSpace.from_counts(sizes, 9, com_channels=(0, 1, 2))
    x0, _, _, _ = molecules(sizes, seed=11, dtype=torch.float32)
    x0 = space.project(x0)
    loss_fn = DenoisingLoss(md.VP.cosine(), prediction="eps", weighting="mse")
    # a fixed evaluation set of (t, noise) draws, the same before and after training
    g = torch.Generator().manual_seed(1)
    evals = [(torch.rand(len(sizes), generator=g, dtype=torch.float64) * 0.98 + 0.01, space.noise(g)) for _ in range(16)]

    def eval_loss():
        with torch.no_grad():
            return sum(loss_fn(net, x0, space, t=t, noise=n).loss.item() for t, n in evals) / len(evals)

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g_train = torch.Generator().manual_seed(2)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(net, x0, space, g_train).loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_classifier_free_guidance_with_nan_rows_as_the_unconditional_branch():
    from multidiff.guidance import ClassifierFreeGuidance

    net = make("egnn")
    x, t, batch, props = molecules()
    space = md.GraphSpace(batch, 9, com_channels=(0, 1, 2), dtype=x.dtype)
    model = md.Denoiser(net, md.VP.cosine(), prediction="eps")
    x = space.project(x)
    guided = ClassifierFreeGuidance(
        model, {"properties": props}, {"properties": null_properties(len(SIZES), NUM_PROPS, dtype=x.dtype)}, scale=1.5
    )
    out = guided(x, t, space)
    x0_c, x0_u = model(x, t, space, properties=props), model(x, t, space)
    torch.testing.assert_close(out, x0_c + 1.5 * (x0_c - x0_u), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["egnn", "tfn"])
def test_positions_only_inputs_are_equivariant(kind):
    """``F = 3`` (no atom features; point clouds): a constant feature per node, vector output only."""
    cfg = {"kind": kind, "num_features": 3, "num_layers": 2}
    torch.manual_seed(0)
    net = build_network(cfg).double()
    x, t, batch, _ = molecules()
    pos = x[:, :3]
    out = net(pos, t, batch=batch)
    q = random_orthogonal(-1, seed=9)
    out2 = net(pos @ q.T + 3.0, t, batch=batch)
    assert out.shape == pos.shape and out.abs().max() > 1e-4
    torch.testing.assert_close(out2, out @ q.T, atol=TOL, rtol=0)
    assert item_mean(out, batch).abs().max() < 1e-12
