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
#include <limits>
#include <vector>

namespace {

struct Part {
  const uint8_t* codes = nullptr;
  const at::Half* scale = nullptr;
  const at::Half* zero = nullptr;  // null: symmetric, value = (code - levels) * scale
  int bits = 0;
  int64_t units = 0;  // units per (block, batch row, head) in this part
};

struct Store {
  Part high, low;
  const int16_t* slot = nullptr;  // [S, B, H, N]: slot in high ++ low; null: everything is in `low`
  int64_t units = 0;              // N
  int64_t unit_size = 1;          // U
};

Part make_part(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
               int64_t units) {
  Part p;
  if (!codes.defined() || codes.numel() == 0) return p;
  p.codes = codes.data_ptr<uint8_t>();
  p.scale = scale.data_ptr<at::Half>();
  p.zero = (zero.defined() && zero.numel()) ? zero.data_ptr<at::Half>() : nullptr;
  p.bits = static_cast<int>(bits);
  p.units = units;
  return p;
}

// Codes e0 .. e0 + n - 1 of a packed bit stream, as floats.
inline void decode(const uint8_t* codes, int64_t e0, int64_t n, int bits, float* out) {
  if (bits == 8) {
    const uint8_t* p = codes + e0;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
    return;
  }
  if (bits == 4 && (e0 & 1) == 0 && (n & 1) == 0) {
    const uint8_t* p = codes + (e0 >> 1);
    for (int64_t i = 0; i < n / 2; ++i) {
      const uint8_t b = p[i];
      out[2 * i] = static_cast<float>(b & 15);
      out[2 * i + 1] = static_cast<float>(b >> 4);
    }
    return;
  }
  if (bits == 2 && (e0 & 3) == 0 && (n & 3) == 0) {
    const uint8_t* p = codes + (e0 >> 2);
    for (int64_t i = 0; i < n / 4; ++i) {
      const uint8_t b = p[i];
      out[4 * i] = static_cast<float>(b & 3);
      out[4 * i + 1] = static_cast<float>((b >> 2) & 3);
      out[4 * i + 2] = static_cast<float>((b >> 4) & 3);
      out[4 * i + 3] = static_cast<float>(b >> 6);
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
    out[i] = static_cast<float>((word >> shift) & mask);
  }
}

// Part and row (index of the unit's row among all rows of that part) of unit `u` of block row `sbh`.
inline const Part& locate(const Store& st, int64_t sbh, int64_t u, int64_t& row) {
  int64_t slot = st.slot ? st.slot[sbh * st.units + u] : u;
  if (st.slot && slot < st.high.units) {
    row = sbh * st.high.units + slot;
    return st.high;
  }
  if (st.slot) slot -= st.high.units;
  row = sbh * st.low.units + slot;
  return st.low;
}

inline float levels_of(const Part& p) { return static_cast<float>((1 << (p.bits - 1)) - 1); }

}  // namespace

// q: [B, Hkv, R, D] fp32 (pre-scaled). visible: [B, L] bool (by token index).
// rope: {offset cos [D, T], offset sin [D, T], base cos [S, B, D], base sin [S, B, D]} fp32, where
// RoPE at position p0 + t is cos = bc * oc - bs * os, sin = bs * oc + bc * os; empty = post-RoPE keys.
// Returns {acc [B, Hkv, R, D], m [B, Hkv, R], l [B, Hkv, R]}.
std::vector<at::Tensor> packed_decode(const at::Tensor& q, const std::vector<at::Tensor>& key_parts,
                                      const std::vector<at::Tensor>& value_parts,
                                      const std::vector<int64_t>& meta, const at::Tensor& visible,
                                      const std::vector<at::Tensor>& rope) {
  // meta: S, T, start, key bits high, key units high, key bits low, key units low,
  //       value bits high, value units high, value bits low, value units low, value unit size
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == at::kFloat, "q must be contiguous fp32");
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const int64_t S = meta[0], T = meta[1], start = meta[2];
  const int64_t L = visible.size(1);
  TORCH_CHECK(start + S * T <= L, "the visibility mask does not cover the blocks");

  Store ks, vs;
  ks.high = make_part(key_parts[0], key_parts[1], key_parts[2], meta[3], meta[4]);
  ks.low = make_part(key_parts[3], key_parts[4], key_parts[5], meta[5], meta[6]);
  ks.slot = key_parts[6].numel() ? key_parts[6].data_ptr<int16_t>() : nullptr;
  ks.units = D;
  vs.high = make_part(value_parts[0], value_parts[1], value_parts[2], meta[7], meta[8]);
  vs.low = make_part(value_parts[3], value_parts[4], value_parts[5], meta[9], meta[10]);
  vs.slot = value_parts[6].numel() ? value_parts[6].data_ptr<int16_t>() : nullptr;
  vs.unit_size = meta[11];
  vs.units = D / vs.unit_size;

  const bool rotate = !rope.empty();
  const float* ocos = rotate ? rope[0].data_ptr<float>() : nullptr;
  const float* osin = rotate ? rope[1].data_ptr<float>() : nullptr;
  const float* bcos = rotate ? rope[2].data_ptr<float>() : nullptr;
  const float* bsin = rotate ? rope[3].data_ptr<float>() : nullptr;
  const float* qp = q.data_ptr<float>();
  const bool* visp = visible.data_ptr<bool>();

  auto part_acc = at::zeros({S, B, H, R, D}, q.options());
  auto part_m = at::full({S, B, H, R}, -std::numeric_limits<float>::infinity(), q.options());
  auto part_l = at::zeros({S, B, H, R}, q.options());
  float* pacc = part_acc.data_ptr<float>();
  float* pm = part_m.data_ptr<float>();
  float* pl = part_l.data_ptr<float>();
  const int64_t half = D / 2;
  const int64_t U = vs.unit_size;

  at::parallel_for(0, S * B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(R * T), ka(T), kb(T), row(U), w(R), zterm(R), ca(T), sa(T), cb(T), sb(T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / (B * H), b = (item / H) % B, h = item % H;
      const int64_t sbh = item;  // (s * B + b) * H + h
      const int64_t tok0 = start + s * T;
      const bool* vis = visp + b * L + tok0;
      const float* base_c = rotate ? bcos + (s * B + b) * D : nullptr;
      const float* base_s = rotate ? bsin + (s * B + b) * D : nullptr;
      const float* qb = qp + (b * H + h) * R * D;
      std::fill(scores.begin(), scores.end(), 0.0f);

      // keys: channel pairs (c, c + D/2), rotated like rotate_half RoPE, dotted with every query row
      for (int64_t c = 0; c < (rotate ? half : D); ++c) {
        int64_t row_a = 0;
        const Part& pa = locate(ks, sbh, c, row_a);
        decode(pa.codes, row_a * T, T, pa.bits, ka.data());
        const float scale_a = static_cast<float>(pa.scale[row_a]);
        const float za = pa.zero ? static_cast<float>(pa.zero[row_a]) : -levels_of(pa) * scale_a;
        for (int64_t t = 0; t < T; ++t) ka[t] = ka[t] * scale_a + za;
        if (!rotate) {
          for (int64_t r = 0; r < R; ++r) {
            const float qa = qb[r * D + c];
            float* sc = scores.data() + r * T;
            for (int64_t t = 0; t < T; ++t) sc[t] += qa * ka[t];
          }
          continue;
        }
        const int64_t c2 = c + half;
        int64_t row_b = 0;
        const Part& pb = locate(ks, sbh, c2, row_b);
        decode(pb.codes, row_b * T, T, pb.bits, kb.data());
        const float scale_b = static_cast<float>(pb.scale[row_b]);
        const float zb = pb.zero ? static_cast<float>(pb.zero[row_b]) : -levels_of(pb) * scale_b;
        // cos / sin of every token of the block for channels c and c2, by angle addition
        const float bca = base_c[c], bsa = base_s[c], bcb = base_c[c2], bsb = base_s[c2];
        const float *oca = ocos + c * T, *osa = osin + c * T, *ocb = ocos + c2 * T, *osb = osin + c2 * T;
        for (int64_t t = 0; t < T; ++t) {
          ca[t] = bca * oca[t] - bsa * osa[t];
          sa[t] = bsa * oca[t] + bca * osa[t];
          cb[t] = bcb * ocb[t] - bsb * osb[t];
          sb[t] = bsb * ocb[t] + bcb * osb[t];
        }
        for (int64_t t = 0; t < T; ++t) {
          const float xa = ka[t], xb = kb[t] * scale_b + zb;
          ka[t] = xa * ca[t] - xb * sa[t];
          kb[t] = xb * cb[t] + xa * sb[t];
        }
        for (int64_t r = 0; r < R; ++r) {
          const float qa = qb[r * D + c], qc = qb[r * D + c2];
          float* sc = scores.data() + r * T;
          for (int64_t t = 0; t < T; ++t) sc[t] += qa * ka[t] + qc * kb[t];
        }
      }

      // softmax partial of the block
      float* m_out = pm + item * R;
      float* l_out = pl + item * R;
      for (int64_t r = 0; r < R; ++r) {
        float* sc = scores.data() + r * T;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          if (!vis[t]) sc[t] = -std::numeric_limits<float>::infinity();
          mx = std::max(mx, sc[t]);
        }
        float sum = 0.0f;
        if (std::isinf(mx)) {
          std::fill(sc, sc + T, 0.0f);
        } else {
          for (int64_t t = 0; t < T; ++t) {
            sc[t] = vis[t] ? std::exp(sc[t] - mx) : 0.0f;
            sum += sc[t];
          }
        }
        m_out[r] = mx;
        l_out[r] = sum;
      }

      // values: per token and group, acc += p * (code * scale + zero)
      float* acc = pacc + item * R * D;
      for (int64_t g = 0; g < vs.units; ++g) {
        int64_t vrow = 0;
        const Part& pv = locate(vs, sbh, g, vrow);
        std::fill(zterm.begin(), zterm.end(), 0.0f);
        const float lv = pv.zero ? 0.0f : levels_of(pv);
        for (int64_t t = 0; t < T; ++t) {
          if (!vis[t]) continue;
          const int64_t meta_index = vrow * T + t;
          const float scale = static_cast<float>(pv.scale[meta_index]);
          const float zero = pv.zero ? static_cast<float>(pv.zero[meta_index]) : -lv * scale;
          decode(pv.codes, meta_index * U, U, pv.bits, row.data());
          for (int64_t r = 0; r < R; ++r) {
            const float p = scores[r * T + t];
            w[r] = p * scale;
            zterm[r] += p * zero;
          }
          for (int64_t r = 0; r < R; ++r) {
            float* out = acc + r * D + g * U;
            const float wr = w[r];
            for (int64_t u = 0; u < U; ++u) out[u] += wr * row[u];
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          float* out = acc + r * D + g * U;
          for (int64_t u = 0; u < U; ++u) out[u] += zterm[r];
        }
      }
    }
  });

  // merge the blocks of every (batch row, head)
  auto m = std::get<0>(part_m.max(0));
  auto safe = at::where(at::isinf(m), at::zeros_like(m), m);
  auto weight = at::exp(part_m - safe.unsqueeze(0));
  auto l = (part_l * weight).sum(0);
  auto acc = (part_acc * weight.unsqueeze(-1)).sum(0);
  return {acc, m, l};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("packed_decode", &packed_decode, "decode attention over packed key/value blocks");
}
