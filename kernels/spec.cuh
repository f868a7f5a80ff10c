// The compile-time arguments of the op's kernels, grouped so that a name expression reads
// as what it is (cupy_qknorm/tuning.py's Spec writes them):
//   qknorm::fused<qknorm::bf16_t, float, 2, qknorm::Widths<3072, 512>,
//                 qknorm::Tiling<7, 2, 0>, qknorm::NeoX<128, 64>>
#pragma once

namespace qknorm {

// This rank's slice of a row: the widths of its q and k parts, in elements.
template <int QWidth, int KWidth>
struct Widths {
  static constexpr int kQ = QWidth;
  static constexpr int kK = KWidth;
};

// How the fused kernel's block holds tokens: its warps, the tokens it keeps in flight (the
// ring's depth: 2 or more), and whether those rows are staged in shared memory (1) or held
// in registers (0).
template <int Warps, int Depth, int Staged>
struct Tiling {
  static constexpr int kWarps = Warps;
  static constexpr int kThreads = Warps * 32;
  static constexpr int kDepth = Depth;
  static constexpr int kStaged = Staged;
};

// The rotary embedding after the norm: the first RotaryDim elements of every head of
// HeadDim elements rotate, in the style of NeoX (element i pairs with i + RotaryDim / 2)
// or GPT-J (elements 2i and 2i + 1 pair). NoRope: the norm alone.
constexpr int kRopeNone = 0, kRopeNeox = 1, kRopeGptj = 2;

template <int HeadDim, int RotaryDim, int Style>
struct Rotary {
  static constexpr int kHead = HeadDim;
  static constexpr int kRotary = RotaryDim;
  static constexpr int kStyle = Style;
};

using NoRope = Rotary<0, 0, kRopeNone>;
template <int HeadDim, int RotaryDim> using NeoX = Rotary<HeadDim, RotaryDim, kRopeNeox>;
template <int HeadDim, int RotaryDim> using GptJ = Rotary<HeadDim, RotaryDim, kRopeGptj>;

}  // namespace qknorm
