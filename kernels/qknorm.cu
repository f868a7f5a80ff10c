// Tensor-parallel QK RMSNorm, with RoPE after it or not:
//
//   out = round(rope(x * w / sqrt(sum over all ranks of sum(x^2) / full_width + eps)))
//
// for q and k of every token, where each of G ranks holds a contiguous slice of the row
// (whole heads, with RoPE), rounded once. docs/design.md walks the headers in order.
//
// Entry file of the op's module: cupy_qknorm/compile.py compiles this with
// name_expressions, which instantiate exactly the specializations asked for
// (cupy_qknorm/tuning.py's Spec.names writes them):
//   qknorm::fused<Elem, Weight, World, Widths<QWidth, KWidth>, Tiling<Warps, Depth, Staged>,
//                 Rope>                          the op, its partials exchanged over IPC
//   qknorm::partial_sums<Elem, Widths<QWidth, KWidth>, Warps>
//   qknorm::apply<Elem, Weight, Widths<QWidth, KWidth>, Warps, Rope>
//                                                the unfused path, around an all-reduce
//   qknorm::reject<World>                        a refused input, told to the peers
// where Elem is qknorm::bf16_t, qknorm::f16_t or float, Weight is Elem or float, and Rope
// is qknorm::NoRope, qknorm::NeoX<HeadDim, RotaryDim> or qknorm::GptJ<HeadDim, RotaryDim>
// (spec.cuh), e.g.
//   qknorm::fused<qknorm::bf16_t, float, 2, qknorm::Widths<3072, 512>,
//                 qknorm::Tiling<7, 2, 0>, qknorm::NoRope>
// The kernels that are not the op (the P2P probe, the benchmark's floors and its separate
// RoPE kernel) are the tools module's, tools.cu: built only where they are used.
#include "fused.cuh"
#include "unfused.cuh"
