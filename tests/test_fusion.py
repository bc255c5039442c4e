import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
from helpers import U32, U64, gamma

from dcff_jax.method import fusion


def kaiming_filters(seed, c, d):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((c, d)) * np.sqrt(2.0 / d)).astype(np.float32)


def distance_error_bound(w: np.ndarray) -> np.ndarray:
    """(c, c) bound on |pairwise_distances(w) - exact| off the diagonal, w (c, d) float32.

    Gram form in float32: s = |a|^2 + |b|^2 - 2 a.b is within E = gamma_{d+2} (|a| + |b|)^2 of
    exact (|a.b| <= |a||b|), then |sqrt(s') - sqrt(s)| <= E / D, plus the square root's rounding.
    """
    w64 = w.astype(np.float64)
    norms = np.linalg.norm(w64, axis=1)
    exact = np.sqrt(((w64[:, None, :] - w64[None, :, :]) ** 2).sum(-1))
    with np.errstate(divide="ignore"):
        return gamma(w.shape[1] + 2) * (norms[:, None] + norms[None, :]) ** 2 / exact + U32 * exact


def softmax_rtol(logit_error: float, max_logit: float, c: int) -> float:
    """Relative bound between two float32 row-softmaxes of c logits that differ by at most
    `logit_error`: each logit also rounds (u |l|) and exp adds <= 2 ulps per path; a relative
    error delta in the exponentials moves p_j by <= 2 delta, and the row sum adds gamma_c."""
    return 2 * (logit_error + 2 * U32 * max_logit + 4 * U32) + 2 * gamma(c)


def score_bound(p64: np.ndarray, relative_error: float, eps: float = 0.0) -> np.ndarray:
    """(c,) bound on the error of score_j = sum_i p_ji (log p_ji - mean_k log(p_ki + eps)) when
    every p and log carries `relative_error` (relative; absolute for logs) and the sums gamma_c:
    first order, 2 (relative_error + 8 u + 2 gamma_c) sum_i p_ji (1 + |log p_ji| + |M_i|)."""
    c = p64.shape[0]
    log_p = np.log(np.maximum(p64, np.finfo(np.float64).tiny))
    mean_log_q = np.mean(np.log(p64 + eps), axis=0) if eps else np.mean(log_p, axis=0)
    magnitude = np.sum(p64 * (1 + np.abs(log_p) + np.abs(mean_log_q)[None, :]), axis=1)
    return 2 * (relative_error + 8 * U32 + 2 * gamma(c)) * magnitude


@pytest.mark.parametrize("c,d", [(4, 3), (16, 27), (64, 144), (200, 72)])
def test_pairwise_distances_match_cdist(c, d):
    w = kaiming_filters(c + d, c, d)
    got = np.asarray(fusion.pairwise_distances(w)).astype(np.float64)
    w64 = w.astype(np.float64)
    want = np.sqrt(((w64[:, None, :] - w64[None, :, :]) ** 2).sum(-1))
    off = ~np.eye(c, dtype=bool)  # the published cdist is this float64 value, cast
    assert np.all(np.abs(got - want)[off] <= distance_error_bound(w)[off])
    assert np.all(np.diag(got) == 0.0)
    np.testing.assert_array_equal(got, got.T)


def schedule_tolerance(num_epochs, t_s=1.0, t_e=1e4, k=1.0, u=U64) -> float:
    """~10 floating-point ops whose largest intermediate is A = 2 (T_e - T_s)(1 + e^-kE) /
    (1 - e^-kE), and T = A / (1 + e^-ke) + T_s - A / 2 cancels: 16 u A absolute."""
    return 16 * u * 2 * (t_e - t_s) * (1 + np.exp(-k * num_epochs)) / (1 - np.exp(-k * num_epochs))


def test_temperature_matches_published_schedule():
    for num_epochs in (1, 3, 90, 300):
        tolerance = schedule_tolerance(num_epochs)
        for epoch in range(0, num_epochs + 1, max(1, num_epochs // 7)):
            want = ref.published_temperature(epoch, num_epochs)
            assert fusion.temperature(epoch, num_epochs) == pytest.approx(want, abs=tolerance)
    assert fusion.temperature(0, 300) == pytest.approx(1.0, abs=schedule_tolerance(300))
    assert fusion.temperature(300, 300) == pytest.approx(1e4, abs=schedule_tolerance(300))
    assert 4000 < fusion.temperature(1, 300) < 5000  # sigmoid in epochs: ~4600 at e = 1


def paper_temperature(e, E, t_s, t_e, k):
    """Eq. (8) as the paper writes it: T(e) = A / (1 + exp(-k e)) + T_s - A / 2 with
    A = 2 (T_e - T_s)(1 + exp(-k E)) / (1 - exp(-k E)); T(0) = T_s and T(E) = T_e."""
    a = 2 * (t_e - t_s) * (1 + np.exp(-k * E)) / (1 - np.exp(-k * E))
    return a / (1 + np.exp(-k * e)) + t_s - a / 2


@pytest.mark.parametrize("t_s,t_e,k", [(2.0, 50.0, 0.5), (0.5, 1e3, 0.05), (10.0, 20.0, 3.0)])
def test_temperature_uses_t_start_t_end_and_k(t_s, t_e, k):
    # By hand: T_s=2, T_e=50, k=0.5, E=10: A = 96 (1 + e^-5) / (1 - e^-5) = 97.30246...,
    # T(3) = A / (1 + e^-1.5) + 2 - A / 2 = 32.90078...
    if (t_s, t_e, k) == (2.0, 50.0, 0.5):
        assert fusion.temperature(3, 10, t_s, t_e, k) == pytest.approx(32.90078, abs=1e-5)
    tolerance64 = schedule_tolerance(10, t_s, t_e, k)
    for epoch in (0, 1, 3, 7, 10):
        want = paper_temperature(epoch, 10, t_s, t_e, k)
        assert fusion.temperature(epoch, 10, t_s, t_e, k) == pytest.approx(want, abs=tolerance64)
        traced = jax.jit(lambda e: fusion.temperature(e, 10, t_s, t_e, k))(jnp.int32(epoch))
        assert float(traced) == pytest.approx(want, abs=schedule_tolerance(10, t_s, t_e, k, U32))
    assert fusion.temperature(0, 10, t_s, t_e, k) == pytest.approx(t_s, abs=tolerance64)
    assert fusion.temperature(10, 10, t_s, t_e, k) == pytest.approx(t_e, abs=tolerance64)


def test_temperature_traced_inside_jit():
    jitted = jax.jit(lambda e: fusion.temperature(e, 300))
    for epoch in (0, 1, 5, 150):
        want = ref.published_temperature(epoch, 300)
        assert float(jitted(jnp.int32(epoch))) == pytest.approx(
            want, abs=schedule_tolerance(300, u=U32)
        )


def test_temperature_rejects_nonpositive_epochs():
    with pytest.raises(ValueError, match="num_epochs"):
        fusion.temperature(0, 0)


@pytest.mark.parametrize("c,d", [(8, 9), (32, 27), (96, 64)])
@pytest.mark.parametrize("t", [1.0, 3.0, 20.0])
def test_proxies_and_reference_scores_match_published(c, d, t):
    w = kaiming_filters(7 * c + d, c, d)
    dist = ref.published_distances(w)
    p = np.asarray(fusion.proxies(dist, t))
    # Both are float32 softmaxes of the logits -D T (published: -D / (1 / T), rounded twice:
    # 2 u |l| apart); atol: the smallest normal float32, below which either may flush to zero.
    rtol = softmax_rtol(2 * U32 * float(np.max(dist)) * t, float(np.max(dist)) * t, c)
    np.testing.assert_allclose(p, ref.published_softmax_p(dist, t), rtol=rtol, atol=2.0**-126)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=gamma(c) + 2 * rtol)
    got = np.asarray(fusion.importance(dist, t, "reference"))
    p_published = ref.published_softmax_p(dist, t)
    want = ref.published_scores(p_published)
    assert np.all(np.isfinite(want))
    # O(c^2) against the literal O(c^3) formula, both float32, proxies rtol apart.
    bound = score_bound(p_published.astype(np.float64), rtol, eps=fusion.REFERENCE_EPS)
    assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("t", [50.0, 500.0, 4600.0, 1e4])
def test_reference_scores_are_non_finite_exactly_where_published_are(t):
    # Rows whose proxies underflow to 0 are NaN in the published O(c^3) formula; ours must agree
    # row by row (evaluated on the same proxies, so float flushing cannot differ).
    w = kaiming_filters(int(t), 48, 18)
    w[5] = w[3] + 1e-4  # a near-duplicate pair keeps some rows partly finite longer
    dist = ref.published_distances(w)
    p = np.asarray(fusion.proxies(dist, t))
    want = ref.published_scores(p)
    got = np.asarray(fusion.importance(dist, t, "reference"))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    assert not np.all(np.isfinite(got))


def exact_log_proxies(dist, t: float) -> np.ndarray:
    logits = -np.asarray(dist, np.float64) * t
    log_p = logits - logits.max(axis=1, keepdims=True)
    return log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))


def test_exact_scores_finite_at_every_temperature_and_match_float64():
    w = kaiming_filters(3, 40, 27)
    dist = ref.published_distances(w)
    for t in (1.0, 10.0, 100.0, 4600.0, 1e4):
        got = np.asarray(fusion.importance(dist, t, "exact"))
        assert np.all(np.isfinite(got))
        want = ref.exact_scores(dist, t)
        # float32 log_softmax of logits up to L = max |D T|: each log-proxy within
        # (4 L + 2 c + 8) u of float64 (logit rounding, max-shift, logsumexp of c terms).
        relative = (4 * float(np.max(dist)) * t + 2 * 40 + 8) * U32
        bound = score_bound(np.exp(exact_log_proxies(dist, t)), relative)
        assert np.all(np.abs(got - want) <= bound + gamma(40) * np.abs(want))


def test_exact_and_reference_agree_where_both_finite():
    w = kaiming_filters(4, 24, 18)
    dist = np.asarray(fusion.pairwise_distances(w))
    a = np.asarray(fusion.importance(dist, 1.0, "reference"), np.float64)
    b = np.asarray(fusion.importance(dist, 1.0, "exact"), np.float64)
    # They differ by the epsilon exactly: in float64, sum_i p_ji (M_i - M_i^eps) with
    # M^eps = mean_k log(p_ki + 1e-7); each side within its float32 bound of that.
    p = np.exp(exact_log_proxies(dist, 1.0))
    eps_effect = p @ (
        np.mean(np.log(p), axis=0) - np.mean(np.log(p + fusion.REFERENCE_EPS), axis=0)
    )
    relative = softmax_rtol(2 * U32 * float(np.max(dist)), float(np.max(dist)), 24)
    bound = score_bound(p, relative, fusion.REFERENCE_EPS) + score_bound(p, relative)
    assert np.all(np.abs((a - b) - eps_effect) <= bound)
    assert np.all(np.abs(eps_effect) > 0)


def test_importance_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion"):
        fusion.importance(jnp.zeros((3, 3)), 1.0, "kl")


def test_proxies_tend_to_identity():
    w = kaiming_filters(5, 16, 9)
    p = np.asarray(fusion.proxies(fusion.pairwise_distances(w), 1e4))
    np.testing.assert_array_equal(p, np.eye(16, dtype=np.float32))


def test_fusing_with_identity_changes_nothing():
    kernel = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 5, 8)), jnp.float32)
    np.testing.assert_array_equal(fusion.fuse_kernel(kernel, jnp.eye(8)), kernel)
    fused = fusion.fuse_kernel(kernel, jnp.eye(8)[jnp.array([6, 1])])
    np.testing.assert_array_equal(fused, kernel[..., jnp.array([6, 1])])


def test_fuse_kernel_is_matrix_product_over_filters():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    matrix = rng.random((2, 6)).astype(np.float32)
    want = np.einsum("hwic,mc->hwim", kernel.astype(np.float64), matrix.astype(np.float64))
    # A sum of 6 products per entry, then the result rounded: gamma_6 sum |k m| + u |result|.
    bound = gamma(6) * np.einsum("hwic,mc->hwim", np.abs(kernel), matrix.astype(np.float64))
    got = np.asarray(fusion.fuse_kernel(kernel, matrix), np.float64)
    assert np.all(np.abs(got - want) <= bound + U32 * np.abs(want))


def test_select_kept_is_top_m_with_stable_slots():
    scores = jnp.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.8])
    kept = fusion.select_kept(scores, jnp.array([0, 1, 2], jnp.int32))
    # Filter 1 stays in slot 1; 0 and 2 leave; 5 (0.8) takes slot 0, 3 (0.7) takes slot 2.
    np.testing.assert_array_equal(kept, [5, 1, 3])
    again = fusion.select_kept(scores, kept)
    np.testing.assert_array_equal(again, kept)


def test_select_kept_matches_top_k_set_on_random_inputs():
    rng = np.random.default_rng(2)
    for _ in range(20):
        c = int(rng.integers(2, 40))
        m = int(rng.integers(1, c + 1))
        scores = rng.standard_normal(c).astype(np.float32)
        prev = rng.permutation(c)[:m].astype(np.int32)
        kept = np.asarray(fusion.select_kept(jnp.asarray(scores), jnp.asarray(prev)))
        assert set(kept) == set(np.argsort(-scores)[:m])
        assert len(set(kept)) == m
        stay = np.isin(prev, kept)
        np.testing.assert_array_equal(kept[stay], prev[stay])


def layer_state(c, m):
    return fusion.init_fusion_state(c, m)


def test_update_layer_freezes_on_non_finite_scores():
    w = jnp.asarray(kaiming_filters(6, 32, 27))
    state0, info0 = fusion.update_layer(w, layer_state(32, 12), 1.0, "reference")
    assert not bool(info0["frozen"])
    state1, info1 = fusion.update_layer(w * 3.0, state0, 1e4, "reference")
    assert bool(info1["frozen"])
    assert int(info1["changed"]) == 0
    np.testing.assert_array_equal(state1["scores"], state0["scores"])
    np.testing.assert_array_equal(state1["kept"], state0["kept"])
    # The fusion matrix still follows this epoch's proxies (here: one-hot rows of the kept).
    np.testing.assert_array_equal(state1["matrix"], np.eye(32, dtype=np.float32)[state0["kept"]])


def test_update_layer_selects_published_top_m_and_matrix_rows():
    w = kaiming_filters(8, 20, 12)
    state, _ = fusion.update_layer(jnp.asarray(w), layer_state(20, 7), 1.0, "reference")
    p = ref.published_softmax_p(ref.published_distances(w), 1.0)
    want_scores = ref.published_scores(p)
    assert set(np.asarray(state["kept"])) == set(np.argsort(-want_scores)[:7])
    # The matrix rows are proxies of our float32 distances; the published ones of cdist's.
    d_error = float(np.max(distance_error_bound(w)[~np.eye(20, dtype=bool)]))
    max_logit = float(np.max(ref.published_distances(w)))
    rtol = softmax_rtol(d_error + 2 * U32 * max_logit, max_logit, 20)
    np.testing.assert_allclose(state["matrix"], p[np.asarray(state["kept"])], rtol=rtol, atol=0)


def test_exact_criterion_keeps_changing_selection_where_reference_freezes():
    rng = np.random.default_rng(9)
    w = jnp.asarray(kaiming_filters(9, 32, 27))
    ref_state = ex_state = layer_state(32, 10)
    ref_changed = ex_changed = 0
    for epoch in range(6):
        t = fusion.temperature(epoch, 6)
        ref_state, ref_info = fusion.update_layer(w, ref_state, t, "reference")
        ex_state, ex_info = fusion.update_layer(w, ex_state, t, "exact")
        if epoch > 0:
            ref_changed += int(ref_info["changed"])
            ex_changed += int(ex_info["changed"])
        w = w + 0.3 * jnp.asarray(rng.standard_normal(w.shape), jnp.float32) * jnp.std(w)
    assert ref_changed == 0  # frozen from epoch 1 on, as the published code
    assert ex_changed > 0


def toy_model_trees(rng):
    params = {
        "conv0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 16)), jnp.float32)},
        "block": {
            "conv1": {"kernel": jnp.asarray(rng.standard_normal((1, 1, 16, 24)), jnp.float32)}
        },
        "dense": {"kernel": jnp.ones((24, 10))},
    }
    fusion_tree = {
        "conv0": fusion.init_fusion_state(16, 8),
        "block": {"conv1": fusion.init_fusion_state(24, 5)},
    }
    return params, fusion_tree


def test_update_fusion_updates_every_layer_like_update_layer():
    params, tree = toy_model_trees(np.random.default_rng(3))
    new, info = fusion.update_fusion(params, tree, 0, 10)
    assert set(info) == {"conv0", "block/conv1"}
    for path, layer in (("conv0", new["conv0"]), ("block/conv1", new["block"]["conv1"])):
        kernel = (
            params[path.split("/")[0]]["kernel"]
            if path == "conv0"
            else params["block"]["conv1"]["kernel"]
        )
        old = tree["conv0"] if path == "conv0" else tree["block"]["conv1"]
        # The same temperature as update_fusion's traced float32 T(0), which may differ from 1.
        t = float(fusion.temperature(jnp.asarray(0), jnp.asarray(10)))
        filters = fusion.kernel_filters(kernel)
        want, _ = fusion.update_layer(filters, old, t, "reference")
        np.testing.assert_array_equal(layer["kept"], want["kept"])
        # Same float32 arithmetic, compiled as one program or op by op: rounding order only.
        c = filters.shape[0]
        max_logit = float(np.max(fusion.pairwise_distances(filters))) * t
        rtol = softmax_rtol(0.0, max_logit, c)
        np.testing.assert_allclose(layer["matrix"], want["matrix"], rtol=rtol, atol=2.0**-126)
        p = np.asarray(fusion.proxies(fusion.pairwise_distances(filters), t), np.float64)
        bound = score_bound(p, rtol, fusion.REFERENCE_EPS)
        assert np.all(np.abs(np.asarray(layer["scores"]) - np.asarray(want["scores"])) <= bound)
    assert new["conv0"]["matrix"].shape == (8, 16)


def test_update_fusion_compiles_once_across_epochs():
    params, tree = toy_model_trees(np.random.default_rng(4))
    fusion._update_fusion_jit.clear_cache()
    for epoch in range(4):
        tree, _ = fusion.update_fusion(params, tree, epoch, 4, criterion="exact")
    assert fusion._update_fusion_jit._cache_size() == 1


def test_update_fusion_names_a_layer_without_kernel():
    _, tree = toy_model_trees(np.random.default_rng(5))
    with pytest.raises(ValueError, match="conv0"):
        fusion.update_fusion({"block": {"conv1": {"kernel": jnp.ones((1, 1, 16, 24))}}}, tree, 0, 3)


def test_the_former_module_names_re_export_the_method_package():
    """dcff_jax.fusion, .layers and .plans (rate_strings' former name) keep the public names
    users had; each is the one object in dcff_jax.method."""
    import dcff_jax.fusion
    import dcff_jax.layers
    import dcff_jax.plans
    from dcff_jax import method

    assert dcff_jax.fusion.fuse_kernel is method.fusion.fuse_kernel
    assert dcff_jax.fusion.FUSION_COLLECTION == method.fusion.FUSION_COLLECTION
    assert dcff_jax.layers.FusedConv is method.layers.FusedConv
    assert dcff_jax.layers.torch_default_bias is method.layers.torch_default_bias
    assert dcff_jax.plans.parse_rates is method.rate_strings.parse_rates
    assert dcff_jax.plans.LAYOUTS is method.rate_strings.LAYOUTS
