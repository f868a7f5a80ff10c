"""rope.py: what check() accepts and every way it refuses. Pure: no GPU."""
import numpy as np
import pytest

from cupy_qknorm.rope import STYLES, RoPE, check

MINIMAX = RoPE.minimax_m2()


def test_minimax_m2():
    assert (MINIMAX.head_dim, MINIMAX.rotary_dim, MINIMAX.theta, MINIMAX.style,
            MINIMAX.max_position, MINIMAX.table) == (128, 64, 5e6, "neox", 196608, None)
    assert MINIMAX.style_code == STYLES["neox"] == 1 and MINIMAX.rows() == 196608
    assert RoPE(128, 64, style="gptj").style_code == 2


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_minimax_is_accepted_where_heads_are_whole(world, dtype):
    check(MINIMAX, dtype, world, 6144, 1024)


@pytest.mark.parametrize("world,q_dim,k_dim,name,per_rank", [
    (16, 6144, 1024, "k_dim", "64"),       # the world size is checked elsewhere
    (3, 6144, 1024, "k_dim", "341.333"),
    (8, 6144, 512, "k_dim", "64"),
    (2, 6144 + 64, 1024, "q_dim", "3104"),
])
def test_heads_split_across_ranks_are_refused(world, q_dim, k_dim, name, per_rank):
    with pytest.raises(ValueError) as e:
        check(MINIMAX, "bfloat16", world, q_dim, k_dim)
    text = str(e.value)
    assert text.startswith("RoPE needs whole heads on every rank")
    assert f"{name}={q_dim if name == 'q_dim' else k_dim} over {world} ranks is {per_rank} " \
           f"a rank, not a multiple of head_dim=128" in text


def table(rows=16, rot=64, dtype=np.float32):
    return np.zeros((rows, rot), dtype)


@pytest.mark.parametrize("rope,dtype,match", [
    (RoPE(128, 63, max_position=8), "bfloat16", "rotary_dim must be even and at most head_dim"),
    (RoPE(128, 130, max_position=8), "bfloat16", "rotary_dim must be even and at most head_dim"),
    (RoPE(0, 64, max_position=8), "bfloat16", "rope.head_dim must be a positive int, got 0"),
    (RoPE(128, True, max_position=8), "bfloat16", "rope.rotary_dim must be a positive int"),
    (RoPE(128.0, 64, max_position=8), "bfloat16", "rope.head_dim must be a positive int"),
    (RoPE(128, 64, style="rotate", max_position=8), "bfloat16", "rope.style must be one of"),
    (RoPE(128, 4, max_position=8), "bfloat16", "rotary_dim=4 must be a multiple of 16"),
    (RoPE(128, 4, style="gptj", max_position=8), "bfloat16", "must be a multiple of 8"),
    (RoPE(256, 256, max_position=8), "float32", "rotary_dim=256 is too wide for float32"),
    (RoPE(128, 64), "bfloat16", "rope.max_position must be a positive int, got None"),
    (RoPE(128, 64, max_position=0), "bfloat16", "rope.max_position must be a positive int"),
    (RoPE(128, 64, max_position=2 ** 31), "bfloat16",
     r"rope.max_position must be below 2\^31, got 2147483648"),
    (RoPE(128, 64, theta=1.0, max_position=8), "bfloat16", "rope.theta must be a finite"),
    (RoPE(128, 64, theta=float("inf"), max_position=8), "bfloat16", "rope.theta"),
    (RoPE(128, 64, theta=float("nan"), max_position=8), "bfloat16", "rope.theta"),
    (RoPE(128, 64, theta=True, max_position=8), "bfloat16", "rope.theta"),
    (RoPE(128, 64, theta="1e4", max_position=8), "bfloat16", "rope.theta"),
    (RoPE(128, 64, table=table(dtype=np.float64)), "bfloat16", "rope.table must be float32"),
    (RoPE(128, 64, table=table(rot=32)), "bfloat16", r"rope.table must be float32 \[max_p"),
    (RoPE(128, 64, table=table()[None]), "bfloat16", r"got float32 \[1, 16, 64\]"),
    (RoPE(128, 64, table=table(rows=0)), "bfloat16", "rope.table must be float32"),
    (RoPE(128, 64, table=[[0.0] * 64]), "bfloat16", "rope.table must be float32"),
    (RoPE(128, 64, table=np.zeros((64, 16), np.float32).T), "bfloat16", "C-contiguous"),
    (RoPE(128, 64, max_position=8, table=table()), "bfloat16",
     "max_position=8 but the table has 16 rows"),
])
def test_check_refuses(rope, dtype, match):
    with pytest.raises(ValueError, match=match):
        check(rope, dtype, 2, 6144, 1024)


@pytest.mark.parametrize("head,dtype", [(120, "bfloat16"), (96, "float32"), (40, "float16")])
def test_heads_must_be_whole_vectors_that_fit_a_warp(head, dtype):
    with pytest.raises(ValueError, match=f"rope.head_dim={head} must be a whole number of "
                                         f"16-byte vectors"):
        check(RoPE(head, 8, style="gptj", max_position=8), dtype, 2, 8 * head, 2 * head)


def test_not_a_rope_is_a_type_error():
    with pytest.raises(TypeError, match="rope must be a cupy_qknorm.RoPE or None, got dict"):
        check(dict(head_dim=128), "bfloat16", 2, 6144, 1024)


@pytest.mark.parametrize("rope,dtype", [
    (RoPE(128, 128, max_position=8), "bfloat16"),           # full rotation
    (RoPE(128, 16, max_position=8), "bfloat16"),            # one vector pair in NeoX
    (RoPE(128, 8, style="gptj", max_position=8), "bfloat16"),
    (RoPE(64, 64, theta=10000, max_position=1), "float32"),
    (RoPE(128, 64, table=table(rows=16)), "bfloat16"),
    (RoPE(128, 64, max_position=16, table=table(rows=16)), "float16"),
    (RoPE(np.int64(128), np.int32(64), theta=np.float32(1e4), max_position=np.int64(9)),
     "bfloat16"),
])
def test_check_accepts(rope, dtype):
    check(rope, dtype, 2, 6144, 1024)
    assert rope.rows() == (16 if rope.table is not None else rope.max_position)
