"""Tests of the member axis (optax_wa.members)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from optax_wa import members


def _tree(m=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (m, 4, 2)), "b": jax.random.normal(k2, (m, 2))}


def test_num_members():
    assert members.num_members(_tree(5)) == 5


def test_num_members_names_disagreeing_leaves():
    tree = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}
    with pytest.raises(
        ValueError, match=r"disagree.*\['b'\] has 4|disagree.*\['w'\] has 3"
    ):
        members.num_members(tree)


def test_num_members_rejects_size_zero():
    with pytest.raises(ValueError, match="size 0"):
        members.num_members({"w": jnp.zeros((0, 2))})


@pytest.mark.parametrize(
    "mean_fn",
    [members.member_mean, members.average_members, members.reduced_member_mean],
)
def test_member_means_reject_an_empty_member_axis(mean_fn):
    with pytest.raises(ValueError, match="size 0"):
        mean_fn({"w": jnp.zeros((0, 3))})


def test_num_members_rejects_scalar_leaf_and_empty_tree():
    with pytest.raises(ValueError, match="scalar"):
        members.num_members({"w": jnp.zeros((3, 2)), "s": jnp.float32(1.0)})
    with pytest.raises(ValueError, match="no leaves"):
        members.num_members({})


def test_stack_unstack_roundtrip():
    tree = _tree(3)
    parts = members.unstack(tree)
    assert len(parts) == 3
    np.testing.assert_array_equal(parts[1]["w"], tree["w"][1])
    chex.assert_trees_all_equal(members.stack(parts), tree)


def test_stack_errors():
    with pytest.raises(ValueError, match="at least one"):
        members.stack([])
    with pytest.raises(ValueError, match="structure"):
        members.stack([{"a": jnp.zeros(2)}, {"b": jnp.zeros(2)}])


def test_init_members_keys_and_same_init():
    init = lambda k: {"w": jax.random.normal(k, (3,))}
    key = jax.random.key(1)
    different = members.init_members(init, key, 4)
    keys = jax.random.split(key, 4)
    np.testing.assert_array_equal(different["w"][2], init(keys[2])["w"])
    same = members.init_members(init, key, 4, same_init=True)
    for i in range(4):
        np.testing.assert_array_equal(same["w"][i], init(key)["w"])
    with pytest.raises(ValueError, match="num_members"):
        members.init_members(init, key, 0)


@pytest.mark.parametrize("m", [1, 3, 40])
def test_average_members_equals_numpy_mean(m):
    tree = _tree(m)
    avg = members.average_members(tree)
    for k in tree:
        np.testing.assert_allclose(
            avg[k], np.asarray(tree[k]).mean(0), rtol=1e-6, atol=1e-6
        )


def test_average_members_bf16_accumulates_in_float32():
    # 1 + 2**-8 is not representable in bf16; the float32 accumulation keeps
    # the pair sum exact, the result is rounded once.
    x = jnp.array([[256.0], [1.0], [1.0], [2.0]], jnp.bfloat16)
    avg = members.average_members({"x": x})["x"]
    assert avg.dtype == jnp.bfloat16
    assert float(avg[0]) == 65.0


def test_member_mean_named_equals_stacked_and_pull_keeps_mean():
    tree = _tree(4)
    stacked = members.member_mean(tree)
    named = jax.vmap(lambda t: members.member_mean(t, "m"), axis_name="m")(tree)
    chex.assert_trees_all_close(stacked, named, rtol=1e-6)
    pulled = members.pull_to_mean(tree, 0.3)
    pulled_named = jax.vmap(lambda t: members.pull_to_mean(t, 0.3, "m"), axis_name="m")(
        tree
    )
    chex.assert_trees_all_close(pulled, pulled_named, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
        members.average_members(pulled), members.average_members(tree), atol=1e-6
    )
    expected = 0.3 * np.asarray(tree["w"]) + 0.7 * np.asarray(tree["w"]).mean(0)
    np.testing.assert_allclose(pulled["w"], expected, rtol=1e-6, atol=1e-6)


def test_interpolate_closed_form():
    a = {"x": jnp.array([1.0, 2.0])}
    b = {"x": jnp.array([3.0, 6.0])}
    np.testing.assert_allclose(members.interpolate(a, b, 0.25)["x"], [2.5, 5.0])


def test_shard_members_places_member_axis():
    mesh = jax.make_mesh((4,), ("members",), devices=jax.devices()[:4])
    sharded = members.shard_members(_tree(8), mesh)
    for leaf in jax.tree.leaves(sharded):
        assert leaf.sharding.spec == P("members")
        assert len(leaf.addressable_shards) == 4
        assert leaf.addressable_shards[0].data.shape[0] == 2
    with pytest.raises(ValueError, match="evenly"):
        members.shard_members(_tree(3), mesh)
    with pytest.raises(ValueError, match="not an axis"):
        members.shard_members(_tree(8), mesh, axis="data")


def test_per_member_does_not_mix_members():
    import optax

    # Global-norm clipping per member: a huge member must not shrink a small one.
    inner = optax.clip_by_global_norm(1.0)
    opt = members.per_member(inner)
    grads = {"w": jnp.array([[0.3, 0.4], [300.0, 400.0]])}
    updates, _ = opt.update(grads, opt.init(grads), grads)
    np.testing.assert_allclose(updates["w"], [[0.3, 0.4], [0.6, 0.8]], rtol=1e-6)


def test_average_and_reduced_mean_named_equal_stacked():
    tree = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(4))
    stacked = members.average_members(tree)
    named = jax.vmap(lambda t: members.average_members(t, "m"), axis_name="m")(tree)
    for k in tree:
        np.testing.assert_array_equal(named[k][0], stacked[k])  # same on every member
        assert stacked[k].dtype == jnp.bfloat16
    reduced = members.reduced_member_mean(tree)
    for k in tree:
        assert reduced[k].dtype == jnp.float32
        want = np.asarray(tree[k], np.float64).mean(0)
        np.testing.assert_allclose(reduced[k], want, rtol=1e-6, atol=1e-6)
        # average_members is the reduced mean rounded once to the leaf's dtype.
        np.testing.assert_array_equal(
            np.asarray(stacked[k], np.float32),
            np.asarray(reduced[k].astype(jnp.bfloat16), np.float32),
        )


@pytest.mark.parametrize(
    "fn",
    [
        members.average_members,
        members.member_mean,
        members.reduced_member_mean,
        lambda t: members.pull_to_mean(t, 0.5),
        lambda t: members.pair_mean(t, jnp.array([[0, 1], [0, 1]])),
    ],
)
def test_member_means_reject_integer_leaves(fn):
    # The truncated mean of 1 and 2 would be 1.
    tree = {"w": jnp.array([[1.5], [2.5]]), "n": jnp.array([[1], [2]], jnp.int32)}
    with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
        fn(tree)


def test_pair_mean_closed_form_and_named_equals_stacked():
    tree = _tree(4)
    pairs = jnp.array([[0, 1], [2, 3], [1, 3], [0, 2]])
    got = members.pair_mean(tree, pairs)
    w = np.asarray(tree["w"], np.float64)
    for i, (a, b) in enumerate(np.asarray(pairs)):
        np.testing.assert_allclose(got["w"][i], 0.5 * (w[a] + w[b]), rtol=1e-6)
    named = jax.vmap(lambda t: members.pair_mean(t, pairs, "m"), axis_name="m")(tree)
    chex.assert_trees_all_close(got, named, rtol=1e-6, atol=1e-7)


def test_per_member_init_on_an_empty_tree():
    import optax

    # tree_map_params inits with a leafless placeholder; an empty tree works too.
    opt = members.per_member(optax.adam(0.1))
    state = opt.init({})
    assert jax.tree.leaves(state)  # the inner counter
