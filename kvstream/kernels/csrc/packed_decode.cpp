// Decode attention over packed key/value blocks in one pass on the CPU.
//
// For every (batch row, KV head, block) the key codes are decoded channel pair by channel pair,
// dequantized with the block's per-channel scale, rotated with RoPE at the tokens' positions (by
// angle addition from the block's first position and the in-block offset: no table as long as
// the history) and
// dotted with the grouped queries; the block's softmax partial (max, sum, unnormalised output)
// is then accumulated from the value codes with their per-token scales. Blocks run in parallel
// (at::parallel_for) and their partials are merged with the log-sum-exp rule. The layout is the
// one kvstream's SplitStore writes: [blocks, batch, heads, units, tokens, unit size], codes
// packed as a little-endian bit stream (code e at bit e * bits), outlier units in a separate
// high-precision part found through a per-unit slot table.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

// The values of 8-bit scale codes: 2 ** (c / 12 - 14), as kvstream.quant.scales.log_scale_table computes them
// (in double, rounded once to float).
const float* log_scales() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int c = 0; c < 256; ++c) t[c] = static_cast<float>(std::exp2(c / 12.0 - 14.0));
    return t;
  }();
  return table.data();
}

// Per-slice metadata: fp16, or fp32 where fp16 cannot hold a tensor's values, or (scales only) 8-bit
// logarithmic codes (kvstream.quant.scales).
struct Meta {
  const at::Half* half = nullptr;
  const float* full = nullptr;
  const uint8_t* log8 = nullptr;
  const float* log_table = nullptr;  // `log_scales`, with `log8`
  explicit operator bool() const { return half != nullptr || full != nullptr || log8 != nullptr; }
  float operator[](int64_t i) const {
    return half ? static_cast<float>(half[i]) : log8 ? log_table[log8[i]] : full[i];
  }
};

Meta make_meta(const at::Tensor& t) {
  Meta m;
  if (!t.defined() || t.numel() == 0) return m;
  if (t.scalar_type() == at::kHalf) {
    m.half = t.data_ptr<at::Half>();
  } else if (t.scalar_type() == at::kByte) {
    m.log8 = t.data_ptr<uint8_t>();
    m.log_table = log_scales();
  } else {
    m.full = t.data_ptr<float>();
  }
  return m;
}

// Every value of one byte of packed codes as the levels its codes stand for: [256][8 / bits] for 2-, 4- and
// 8-bit codes; for 3-bit codes, whose bytes straddle codes, [64][2] (two codes of six bits). One table lookup and
// a fixed-size copy then decode several codes, where shifting and converting code by code does not vectorize
// (codes of 2 to 4 bits go sixteen at a time through `word_codes` first; the tables take what is left).
struct ByteLevels {
  std::vector<float> levels;  // empty for other widths (the generic bit loop decodes them)
  float lanes[16] = {};       // 2- to 4-bit codes: the level of code j % 2**bits at lane j, what `word_codes` reads
};

std::shared_ptr<const ByteLevels> byte_levels(int bits, const float* table) {
  auto out = std::make_shared<ByteLevels>();
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return out;
  const int entry_bits = bits == 3 ? 6 : 8;
  const int per_entry = entry_bits / bits;
  const uint32_t mask = (1u << bits) - 1u;
  out->levels.resize(static_cast<size_t>(1 << entry_bits) * per_entry);
  for (uint32_t e = 0; e < (1u << entry_bits); ++e) {
    for (int j = 0; j < per_entry; ++j) {
      const uint32_t code = (e >> (bits * j)) & mask;
      out->levels[e * per_entry + j] = table ? table[code] : static_cast<float>(code);
    }
  }
  if (bits <= 4) {
    for (uint32_t j = 0; j < 16; ++j) out->lanes[j] = table ? table[j & mask] : static_cast<float>(j & mask);
  }
  return out;
}

// The byte tables of plain uniform codes, built once per process: 2 and 3 bits only, since uniform 4- and
// 8-bit codes decode by a plain conversion that vectorizes.
const std::shared_ptr<const ByteLevels>& uniform_levels(int bits) {
  static const std::shared_ptr<const ByteLevels> two = byte_levels(2, nullptr), three = byte_levels(3, nullptr);
  static const std::shared_ptr<const ByteLevels> none = std::make_shared<ByteLevels>();
  return bits == 2 ? two : bits == 3 ? three : none;
}

struct Part {
  const uint8_t* codes = nullptr;
  Meta scale;
  Meta zero;                     // absent: symmetric, value = (code - levels) * scale, or table[code] * scale
  const float* table = nullptr;  // level table (Lloyd-Max): value = table[code] * scale + zero; null: uniform
  std::shared_ptr<const ByteLevels> bytes;  // the codes' byte tables (uniform or from `table`)
  int bits = 0;
  int64_t units = 0;  // units per (block, batch row, head) in this part
};

struct Store {
  Part high, low;
  // [S, B, H, N]: slot in high ++ low, uint8 (up to 128 units) or int16; both null: everything is in `low`
  const uint8_t* slot8 = nullptr;
  const int16_t* slot16 = nullptr;
  bool split() const { return slot8 != nullptr || slot16 != nullptr; }
  int64_t slot(int64_t i) const { return slot8 ? slot8[i] : slot16[i]; }
  int64_t units = 0;              // N
  int64_t unit_size = 1;          // U
};

Part make_part(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& table,
               int64_t bits, int64_t units) {
  Part p;
  if (!codes.defined() || codes.numel() == 0) return p;
  p.codes = codes.data_ptr<uint8_t>();
  p.scale = make_meta(scale);
  p.zero = make_meta(zero);
  p.table = table.numel() ? table.data_ptr<float>() : nullptr;
  p.bits = static_cast<int>(bits);
  p.bytes = p.table ? byte_levels(p.bits, p.table) : uniform_levels(p.bits);
  p.units = units;
  return p;
}

// The first n - n % 16 of n codes of BITS (2 to 4) bits whose stream starts at byte b, sixteen codes (2 * BITS
// bytes) at a time, as levels: each half's eight codes shifted out of one little-endian word together, then
// looked up among the levels (`ByteLevels::lanes`, uniform codes or the quantizer's table) by a vector
// shuffle; returns how many were decoded. GCC's vector extensions; other compilers decode none here and the
// byte tables serve every code.
template <int BITS>
inline int64_t word_codes(const uint8_t* b, int64_t n, const float* lanes, float* out) {
#if defined(__GNUC__) && !defined(__clang__)
  typedef uint32_t v16u __attribute__((vector_size(64)));
  typedef int32_t v16i __attribute__((vector_size(64)));
  typedef float v16f __attribute__((vector_size(64)));
  constexpr uint32_t mask = (1u << BITS) - 1u;
  constexpr uint32_t h = BITS == 2 ? 16 : 0;  // 2 bits: one word holds all sixteen codes
  const v16u shifts = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS, h, h + BITS, h + 2 * BITS,
                       h + 3 * BITS, h + 4 * BITS, h + 5 * BITS, h + 6 * BITS, h + 7 * BITS};
  v16f levels;
  std::memcpy(&levels, lanes, sizeof levels);
  const auto word = [](const uint8_t* w) {  // four bytes, little-endian whatever the machine is
    uint32_t x;
    std::memcpy(&x, w, sizeof x);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap32(x);
#endif
    return x;
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {  // 2 * BITS bytes: the low half's eight codes, then the high half's
    const uint8_t* w = b + i / 8 * BITS;
    const uint32_t lo = word(w), hi = BITS == 2 ? lo : word(w + 2 * BITS - 4) >> (8 * (4 - BITS));
    const v16u halves = {lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi};
    const v16f x = __builtin_shuffle(levels, __builtin_convertvector((halves >> shifts) & mask, v16i));
    std::memcpy(out + i, &x, sizeof x);
  }
  return i;
#else
  return 0;
#endif
}

// Codes e0 .. e0 + n - 1 of a part's packed bit stream (code e at bit e * bits, little-endian) as the levels
// they stand for: the codes themselves (uniform), or their entries of the level table.
inline void decode(const Part& p, int64_t e0, int64_t n, float* out) {
  const int bits = p.bits;
  const float* levels = p.bytes->levels.data();
  const uint8_t* codes = p.codes;
  if (bits == 8) {
    const uint8_t* b = codes + e0;
    if (p.table == nullptr) {  // a plain conversion vectorizes
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(b[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = levels[b[i]];
    }
    return;
  }
  if (bits == 4 && (e0 & 1) == 0 && (n & 1) == 0) {
    const uint8_t* b = codes + (e0 >> 1);
    if (p.table == nullptr) {  // uniform: the two nibbles of a byte convert in a loop that vectorizes
      for (int64_t i = 0; i < n / 2; ++i) {
        out[2 * i] = static_cast<float>(b[i] & 15);
        out[2 * i + 1] = static_cast<float>(b[i] >> 4);
      }
    } else {
      const int64_t words = word_codes<4>(b, n, p.bytes->lanes, out);
      for (int64_t i = words / 2; i < n / 2; ++i) std::memcpy(out + 2 * i, levels + 2 * b[i], 2 * sizeof(float));
    }
    return;
  }
  if (bits == 2 && (e0 & 3) == 0 && (n & 3) == 0) {
    const uint8_t* b = codes + (e0 >> 2);
    const int64_t words = word_codes<2>(b, n, p.bytes->lanes, out);
    for (int64_t i = words / 4; i < n / 4; ++i) std::memcpy(out + 4 * i, levels + 4 * b[i], 4 * sizeof(float));
    return;
  }
  if (bits == 3 && (e0 & 7) == 0 && (n & 7) == 0) {  // eight codes in three bytes, two codes per lookup
    const uint8_t* b = codes + (e0 >> 3) * 3;
    for (int64_t i = word_codes<3>(b, n, p.bytes->lanes, out) / 8; i < n / 8; ++i) {
      const uint32_t word = b[3 * i] | (static_cast<uint32_t>(b[3 * i + 1]) << 8) |
                            (static_cast<uint32_t>(b[3 * i + 2]) << 16);
      for (int j = 0; j < 4; ++j) std::memcpy(out + 8 * i + 2 * j, levels + 2 * ((word >> (6 * j)) & 63u), 8);
    }
    return;
  }
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = (e0 + i) * bits;
    const int64_t byte = bit >> 3;
    const int shift = static_cast<int>(bit & 7);
    uint32_t word = codes[byte];
    if (shift + bits > 8) word |= static_cast<uint32_t>(codes[byte + 1]) << 8;
    const uint32_t code = (word >> shift) & mask;
    out[i] = p.table ? p.table[code] : static_cast<float>(code);
  }
}

// Part and row (index of the unit's row among all rows of that part) of unit `u` of block row `sbh`.
inline const Part& locate(const Store& st, int64_t sbh, int64_t u, int64_t& row) {
  const bool split = st.split();
  int64_t slot = split ? st.slot(sbh * st.units + u) : u;
  if (split && slot < st.high.units) {
    row = sbh * st.high.units + slot;
    return st.high;
  }
  if (split) slot -= st.high.units;
  row = sbh * st.low.units + slot;
  return st.low;
}

// The code a symmetric uniform part subtracts (its zero level); parts with a zero-point or a table subtract none.
inline float levels_of(const Part& p) {
  return (p.zero || p.table) ? 0.0f : static_cast<float>((1 << (p.bits - 1)) - 1);
}

// Channel row `row` of a key part over a block's T tokens (as levels), dequantized in place: one scale and
// zero per token group of T / groups tokens.
inline void dequantize_keys(const Part& p, int64_t row, int64_t T, int64_t groups, float* x) {
  const int64_t span = T / groups;
  for (int64_t j = 0; j < groups; ++j) {
    const float scale = p.scale[row * groups + j];
    const float zero = p.zero ? p.zero[row * groups + j] : -levels_of(p) * scale;
    for (int64_t t = j * span; t < (j + 1) * span; ++t) x[t] = x[t] * scale + zero;
  }
}

}  // namespace

// One group of packed blocks, as `SplitStore`s and `BlockRope` hand them over.
struct Group {
  Store ks, vs;
  int64_t S = 0, T = 0, start = 0;
  int64_t key_groups = 1;  // key ranges per channel and block (token groups of T / key_groups)
  const float *ocos = nullptr, *osin = nullptr, *bcos = nullptr, *bsin = nullptr;  // null: post-RoPE keys
};

// Tokens held exactly in fp32 (sink copies, the tail): keys [B, H, n, D], values [B, H, n, D], visible [B, n].
struct Exact {
  const float* keys = nullptr;
  const float* values = nullptr;
  const bool* visible = nullptr;
  int64_t n = 0;
};

namespace {

// e^x for x <= 0 (a score minus its row maximum), written branch-free so that the softmax loop vectorizes
// where the C library's expf does not: 2^n from the exponent bits times a degree-6 polynomial of the rest
// (relative error about 2e-7; x below -87.3, whose e^x is under float's normal range, gives 0).
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.3f);
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and taking it away rounds to the nearest integer
  const float n = (clamped * 1.44269504f + round) - round;
  const float r = (clamped - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 split in two for an exact product
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : poly * scale;
}

// op over x[0 .. T - 1] from `init`, in sixteen lanes so that the loop vectorizes (op associative and commutative).
template <typename Op>
inline float reduce16(const float* x, int64_t T, float init, Op op) {
  float lanes[16];
  std::fill(lanes, lanes + 16, init);
  int64_t t = 0;
  for (; t + 16 <= T; t += 16)
    for (int j = 0; j < 16; ++j) lanes[j] = op(lanes[j], x[t + j]);
  float out = init;
  for (; t < T; ++t) out = op(out, x[t]);
  for (float lane : lanes) out = op(out, lane);
  return out;
}

// Softmax partial of `T` scores per query row (in place: scores become probabilities); returns via m, l.
inline void softmax_rows(float* scores, int64_t R, int64_t T, const bool* vis, float* m_out, float* l_out) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    float* __restrict__ sc = scores + r * T;
    for (int64_t t = 0; t < T; ++t) sc[t] = vis[t] ? sc[t] : -inf;
    const float mx = reduce16(sc, T, -inf, [](float a, float b) { return std::max(a, b); });
    float sum = 0.0f;
    if (std::isinf(mx)) {
      std::fill(sc, sc + T, 0.0f);
    } else {
      for (int64_t t = 0; t < T; ++t) sc[t] = exp_nonpositive(sc[t] - mx);  // -inf (not visible) gives 0
      sum = reduce16(sc, T, 0.0f, [](float a, float b) { return a + b; });
    }
    m_out[r] = mx;
    l_out[r] = sum;
  }
}

struct Scratch {
  std::vector<float> scores, ka, kb, row, w, zterm;
  void fit(int64_t R, int64_t T, int64_t U) {
    if (static_cast<int64_t>(ka.size()) < T) {
      ka.resize(T), kb.resize(T);
    }
    if (static_cast<int64_t>(scores.size()) < R * T) scores.resize(R * T);
    if (static_cast<int64_t>(row.size()) < U) row.resize(U);
    if (static_cast<int64_t>(w.size()) < R) w.resize(R), zterm.resize(R);
  }
};

// The angle of channel pair (c, c + D/2) at each token of block s, batch row b: cos and sin of the block's first
// position plus the in-block offset, by angle addition (channels c and c + D/2 turn alike: BlockRope.check).
struct PairAngle {
  float bc, bs;
  const float *oc, *os;
  PairAngle(const Group& g, int64_t s, int64_t b, int64_t B, int64_t D, int64_t c)
      : bc(g.bcos[(s * B + b) * D + c]), bs(g.bsin[(s * B + b) * D + c]), oc(g.ocos + c * g.T), os(g.osin + c * g.T) {}
  // channels (c, c + D/2) at token t, (ka, kb), turned like rotate_half RoPE into (xa, xb)
  void turn(int64_t t, float ka, float kb, float& xa, float& xb) const {
    const float cos_t = bc * oc[t] - bs * os[t], sin_t = bs * oc[t] + bc * os[t];
    xa = ka * cos_t - kb * sin_t;
    xb = kb * cos_t + ka * sin_t;
  }
};

// Key channel c of block s of one (batch row, head) dequantized into w.ka; with RoPE, channel c + D/2 too
// (into w.kb), both still unrotated.
void key_pair(const Group& g, int64_t sbh, int64_t D, int64_t c, Scratch& w) {
  const int64_t T = g.T;
  int64_t row_a = 0;
  const Part& pa = locate(g.ks, sbh, c, row_a);
  decode(pa, row_a * T, T, w.ka.data());
  dequantize_keys(pa, row_a, T, g.key_groups, w.ka.data());
  if (g.ocos == nullptr) return;
  int64_t row_b = 0;
  const Part& pb = locate(g.ks, sbh, c + D / 2, row_b);
  decode(pb, row_b * T, T, w.kb.data());
  dequantize_keys(pb, row_b, T, g.key_groups, w.kb.data());
}

// Scores of NR query rows (q: channel c of row r at qa[r * D], channel c + D/2 at qc[r * D]) against one
// dequantized key channel pair rotated at each token, added to sc (row stride T): the rotation is computed
// once for every row, and the rows stay in registers while the loop runs over tokens.
template <int NR>
inline void pair_scores(const float* __restrict__ ka, const float* __restrict__ kb, const PairAngle& angle,
                        const float* qa, const float* qc, int64_t D, int64_t T, float* __restrict__ sc) {
  float a[NR], c[NR];
  for (int r = 0; r < NR; ++r) a[r] = qa[r * D], c[r] = qc[r * D];
  for (int64_t t = 0; t < T; ++t) {
    float xa, xb;
    angle.turn(t, ka[t], kb[t], xa, xb);
    for (int r = 0; r < NR; ++r) sc[r * T + t] += a[r] * xa + c[r] * xb;
  }
}

// The same for one unrotated key channel (post-RoPE keys): qa[r * D] against ka.
template <int NR>
inline void channel_scores(const float* __restrict__ ka, const float* qa, int64_t D, int64_t T,
                           float* __restrict__ sc) {
  float a[NR];
  for (int r = 0; r < NR; ++r) a[r] = qa[r * D];
  for (int64_t t = 0; t < T; ++t)
    for (int r = 0; r < NR; ++r) sc[r * T + t] += a[r] * ka[t];
}

// Rows r0 .. R - 1 taken four at a time (the last take one to three): NR is a compile-time count.
template <typename F>
inline void by_rows(int64_t R, F&& f) {
  int64_t r0 = 0;
  for (; r0 + 4 <= R; r0 += 4) f(r0, std::integral_constant<int, 4>{});
  switch (R - r0) {
    case 3: f(r0, std::integral_constant<int, 3>{}); break;
    case 2: f(r0, std::integral_constant<int, 2>{}); break;
    case 1: f(r0, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// One packed block of one (batch row, head): scores, softmax partial and weighted values.
void block_item(const Group& g, int64_t s, int64_t b, int64_t h, int64_t B, int64_t H, int64_t R, int64_t D,
                const float* qb, const bool* vis, Scratch& w, float* acc, float* m_out, float* l_out) {
  const int64_t T = g.T, half = D / 2, U = g.vs.unit_size;
  const int64_t sbh = (s * B + b) * H + h;
  const bool rotate = g.ocos != nullptr;
  float* scores = w.scores.data();
  std::fill(scores, scores + R * T, 0.0f);
  const float *ka = w.ka.data(), *kb = w.kb.data();

  // keys: channel pairs (c, c + D/2), rotated like rotate_half RoPE, dotted with every query row
  for (int64_t c = 0; c < (rotate ? half : D); ++c) {
    key_pair(g, sbh, D, c, w);
    if (rotate) {
      const PairAngle angle(g, s, b, B, D, c);
      by_rows(R, [&](int64_t r0, auto nr) {
        pair_scores<decltype(nr)::value>(ka, kb, angle, qb + r0 * D + c, qb + r0 * D + c + half, D, T,
                                         scores + r0 * T);
      });
    } else {
      by_rows(R, [&](int64_t r0, auto nr) {
        channel_scores<decltype(nr)::value>(ka, qb + r0 * D + c, D, T, scores + r0 * T);
      });
    }
  }
  softmax_rows(scores, R, T, vis, m_out, l_out);

  // values: per token and group, acc += p * (code * scale + zero)
  float* row = w.row.data();
  for (int64_t grp = 0; grp < g.vs.units; ++grp) {
    int64_t vrow = 0;
    const Part& pv = locate(g.vs, sbh, grp, vrow);
    std::fill(w.zterm.begin(), w.zterm.begin() + R, 0.0f);
    const float lv = levels_of(pv);
    for (int64_t t = 0; t < T; ++t) {
      if (!vis[t]) continue;
      const int64_t meta_index = vrow * T + t;
      const float scale = pv.scale[meta_index];
      const float zero = pv.zero ? pv.zero[meta_index] : -lv * scale;
      decode(pv, meta_index * U, U, row);
      for (int64_t r = 0; r < R; ++r) {
        const float p = scores[r * T + t];
        w.w[r] = p * scale;
        w.zterm[r] += p * zero;
      }
      for (int64_t r = 0; r < R; ++r) {
        float* out = acc + r * D + grp * U;
        const float wr = w.w[r];
        for (int64_t u = 0; u < U; ++u) out[u] += wr * row[u];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* out = acc + r * D + grp * U;
      for (int64_t u = 0; u < U; ++u) out[u] += w.zterm[r];
    }
  }
}

// Dequantized (and, for pre-RoPE keys, rotated) keys and values of block s of one (batch row, head),
// written token-major into k_out / v_out ([T, D] each, row stride D).
void restore_item(const Group& g, int64_t s, int64_t b, int64_t h, int64_t B, int64_t H, int64_t D, Scratch& w,
                  float* k_out, float* v_out) {
  const int64_t T = g.T, half = D / 2, U = g.vs.unit_size;
  const int64_t sbh = (s * B + b) * H + h;
  const bool rotate = g.ocos != nullptr;
  const float *ka = w.ka.data(), *kb = w.kb.data();
  for (int64_t c = 0; c < (rotate ? half : D); ++c) {
    key_pair(g, sbh, D, c, w);
    if (!rotate) {
      for (int64_t t = 0; t < T; ++t) k_out[t * D + c] = ka[t];
      continue;
    }
    const PairAngle angle(g, s, b, B, D, c);
    for (int64_t t = 0; t < T; ++t) angle.turn(t, ka[t], kb[t], k_out[t * D + c], k_out[t * D + c + half]);
  }
  for (int64_t grp = 0; grp < g.vs.units; ++grp) {
    int64_t vrow = 0;
    const Part& pv = locate(g.vs, sbh, grp, vrow);
    const float lv = levels_of(pv);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t meta_index = vrow * T + t;
      const float scale = pv.scale[meta_index];
      const float zero = pv.zero ? pv.zero[meta_index] : -lv * scale;
      float* out = v_out + t * D + grp * U;
      decode(pv, meta_index * U, U, out);
      for (int64_t u = 0; u < U; ++u) out[u] = out[u] * scale + zero;
    }
  }
}

// Exact fp32 tokens of one (batch row, head).
void exact_item(const Exact& e, int64_t b, int64_t h, int64_t H, int64_t R, int64_t D, const float* qb, Scratch& w,
                float* acc, float* m_out, float* l_out) {
  const int64_t n = e.n;
  const float* keys = e.keys + (b * H + h) * n * D;
  const float* values = e.values + (b * H + h) * n * D;
  float* scores = w.scores.data();
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qb[r * D + d] * keys[t * D + d];
      scores[r * n + t] = dot;
    }
  }
  softmax_rows(scores, R, n, e.visible + b * n, m_out, l_out);
  for (int64_t r = 0; r < R; ++r) {
    float* out = acc + r * D;
    for (int64_t t = 0; t < n; ++t) {
      const float p = scores[r * n + t];
      if (p == 0.0f) continue;
      for (int64_t d = 0; d < D; ++d) out[d] += p * values[t * D + d];
    }
  }
}

}  // namespace

void set_slots(Store& st, const at::Tensor& slots) {
  if (slots.numel() == 0) return;
  if (slots.scalar_type() == at::kByte) {
    st.slot8 = slots.data_ptr<uint8_t>();
  } else {
    st.slot16 = slots.data_ptr<int16_t>();
  }
}

Group make_group(const std::vector<at::Tensor>& t, const std::vector<int64_t>& m, int64_t D) {
  Group g;
  g.S = m[0], g.T = m[1], g.start = m[2];
  g.ks.high = make_part(t[0], t[1], t[2], t[14], m[3], m[4]);
  g.ks.low = make_part(t[3], t[4], t[5], t[15], m[5], m[6]);
  set_slots(g.ks, t[6]);
  g.ks.units = D;
  g.vs.high = make_part(t[7], t[8], t[9], t[16], m[7], m[8]);
  g.vs.low = make_part(t[10], t[11], t[12], t[17], m[9], m[10]);
  set_slots(g.vs, t[13]);
  g.vs.unit_size = m[11];
  g.vs.units = D / g.vs.unit_size;
  g.key_groups = m[12];
  TORCH_CHECK(g.key_groups >= 1 && g.T % g.key_groups == 0, "key token groups must divide the block");
  if (t.size() >= 22) {
    g.ocos = t[18].data_ptr<float>(), g.osin = t[19].data_ptr<float>();
    g.bcos = t[20].data_ptr<float>(), g.bsin = t[21].data_ptr<float>();
  }
  return g;
}

// Blocks first .. last - 1 of one group restored to fp32 ([B, H, n, D] keys as attention sees them, values);
// the same arguments as one group of `packed_decode`. Sink slots hold the blocks' clamped codes: paste after.
std::vector<at::Tensor> restore_blocks(const std::vector<at::Tensor>& group, const std::vector<int64_t>& meta,
                                       int64_t B, int64_t H, int64_t D, int64_t first, int64_t last) {
  const Group g = make_group(group, meta, D);
  TORCH_CHECK(0 <= first && first < last && last <= g.S, "block range out of bounds");
  const int64_t T = g.T, n = (last - first) * T;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto keys = at::empty({B, H, n, D}, opts);
  auto values = at::empty({B, H, n, D}, opts);
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  at::parallel_for(0, (last - first) * B * H, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    w.fit(1, T, g.vs.unit_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = first + item / (B * H), b = (item / H) % B, h = item % H;
      const int64_t offset = ((b * H + h) * n + (s - first) * T) * D;
      restore_item(g, s, b, h, B, H, D, w, kp + offset, vp + offset);
    }
  });
  return {keys, values};
}

// Attention of grouped queries q ([B, Hkv, R, D] fp32, pre-scaled) over packed groups and exact segments.
// groups[i] = {key high codes, scale, zero, key low codes, scale, zero, key slots,
//              value high codes, scale, zero, value low codes, scale, zero, value slots,
//              level tables of key high, key low, value high, value low (fp32 [2^bits], empty: uniform),
//              rope offset cos [D/2, T], offset sin [D/2, T], base cos [S, B, D], base sin [S, B, D]} (rope may be
//              absent; both halves of the channels turn alike);
// meta[i] = {S, T, start, key bits high, key units high, key bits low, key units low,
//            value bits high, value units high, value bits low, value units low, value unit size, key groups};
// visible: [B, L] bool by token index for the packed blocks; exact[j] = {keys, values, visible [B, n]}.
// RoPE at position p0 + t: cos = bc * oc - bs * os, sin = bs * oc + bc * os.
// Returns {acc [B, Hkv, R, D], m [B, Hkv, R], l [B, Hkv, R]} merged over everything (softmax = acc / l).
std::vector<at::Tensor> packed_decode(const at::Tensor& q, const std::vector<std::vector<at::Tensor>>& groups,
                                      const std::vector<std::vector<int64_t>>& meta, const at::Tensor& visible,
                                      const std::vector<std::vector<at::Tensor>>& exact) {
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kFloat, "q must be contiguous fp32");
  TORCH_CHECK(visible.is_contiguous() && visible.scalar_type() == at::kBool, "visible must be contiguous bool");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t L = visible.size(1);

  std::vector<Group> gs;
  int64_t max_t = 1, max_u = 1;
  for (size_t i = 0; i < groups.size(); ++i) {
    gs.push_back(make_group(groups[i], meta[i], D));
    TORCH_CHECK(gs[i].start + gs[i].S * gs[i].T <= L, "the visibility mask does not cover the blocks");
    max_t = std::max(max_t, gs[i].T);
    max_u = std::max(max_u, gs[i].vs.unit_size);
  }
  std::vector<Exact> es(exact.size());
  for (size_t j = 0; j < exact.size(); ++j) {
    TORCH_CHECK(exact[j][0].is_contiguous() && exact[j][1].is_contiguous() && exact[j][2].is_contiguous(),
                "exact segments must be contiguous");
    es[j].keys = exact[j][0].data_ptr<float>();
    es[j].values = exact[j][1].data_ptr<float>();
    es[j].visible = exact[j][2].data_ptr<bool>();
    es[j].n = exact[j][0].size(2);
    max_t = std::max(max_t, es[j].n);
  }

  // work items: (group, block) or (exact segment), each over every (batch row, head)
  std::vector<std::pair<int64_t, int64_t>> units;  // (group index or -1 - exact index, block)
  for (size_t i = 0; i < gs.size(); ++i)
    for (int64_t s = 0; s < gs[i].S; ++s) units.emplace_back(static_cast<int64_t>(i), s);
  for (size_t j = 0; j < es.size(); ++j) units.emplace_back(-1 - static_cast<int64_t>(j), 0);
  const int64_t n_units = static_cast<int64_t>(units.size());
  const int64_t BH = B * H;

  auto part_acc = at::zeros({n_units, B, H, R, D}, q.options());
  auto part_m = at::empty({n_units, B, H, R}, q.options());
  auto part_l = at::empty({n_units, B, H, R}, q.options());
  float* pacc = part_acc.data_ptr<float>();
  float* pm = part_m.data_ptr<float>();
  float* pl = part_l.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const bool* visp = visible.data_ptr<bool>();

  at::parallel_for(0, n_units * BH, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    w.fit(R, max_t, max_u);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / BH, b = (item / H) % B, h = item % H;
      const float* qb = qp + (b * H + h) * R * D;
      float* acc = pacc + item * R * D;
      const auto [which, s] = units[u];
      if (which >= 0) {
        const Group& g = gs[which];
        const bool* vis = visp + b * L + g.start + s * g.T;
        block_item(g, s, b, h, B, H, R, D, qb, vis, w, acc, pm + item * R, pl + item * R);
      } else {
        exact_item(es[-1 - which], b, h, H, R, D, qb, w, acc, pm + item * R, pl + item * R);
      }
    }
  });

  // merge the partials of every (batch row, head) with the log-sum-exp rule
  auto out = at::zeros({B, H, R, D}, q.options());
  auto m = at::full({B, H, R}, -std::numeric_limits<float>::infinity(), q.options());
  auto l = at::zeros({B, H, R}, q.options());
  float* po = out.data_ptr<float>();
  float* mo = m.data_ptr<float>();
  float* lo = l.data_ptr<float>();
  at::parallel_for(0, BH * R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / R, r = row % R;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t u = 0; u < n_units; ++u) mx = std::max(mx, pm[(u * BH + bh) * R + r]);
      mo[row] = mx;
      if (std::isinf(mx)) continue;
      float sum = 0.0f;
      float* o = po + row * D;
      for (int64_t u = 0; u < n_units; ++u) {
        const int64_t k = (u * BH + bh) * R + r;
        if (std::isinf(pm[k])) continue;
        const float wgt = std::exp(pm[k] - mx);
        sum += wgt * pl[k];
        const float* a = pacc + k * D;
        for (int64_t d = 0; d < D; ++d) o[d] += wgt * a[d];
      }
      lo[row] = sum;
    }
  });
  return {out, m, l};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("packed_decode", &packed_decode, "decode attention over packed key/value blocks");
  module.def("restore_blocks", &restore_blocks, "packed blocks restored to fp32, keys rotated");
}
