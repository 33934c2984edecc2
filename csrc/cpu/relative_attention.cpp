// CPU relative-position attention (Transformer-XL / XLNet), forward and backward, one stream or XLNet's two
// streams; the spec is ptm_kernels/reference_relative.py. Flash-style like attention.cpp, whose tile
// classification, mask parts, row kernels, dropout and GEMM helpers it shares (attention_common.h): nothing of
// size [Lr, Lk] or [Lr, R] is ever in memory, only tiles.
//
// Position term without a rel-shift: row i (at key-coordinate position p'_i) and key j use r row
// t = base_i + j, base_i = r_offset - p'_i, so the r rows a block of rows needs for the keys [c0, c1) form a
// band [t_lo, t_hi). One GEMM POS = QV_rows r[t_lo:t_hi]^T covers it, and row i adds the slice
// POS[i, base_i + j - t_lo] (contiguous in j) to its scores: a diagonal band for consecutive positions, any
// positions otherwise. The band is n + (spread of the rows' positions) wide, so rows share a band GEMM only
// while their positions lie within kMaxSpread (all the rows of a block when they are consecutive; groups of
// close rows for XLNet's query stream, whose predicted positions come sorted).
//
// Layout of the work:
// - Blocks of kTileM query rows (the tile the mask parts classify at); per block, runs of visible key tiles of
//   at most kChunkN keys: S = QU K^T (GEMM) + the position term + the segment term, then the mask, online
//   softmax (scale folded into the exponential), dropout and P V.
// - Forward: one work item per (b, h, stream, block), the items of one (b, h) consecutive, so k, v, r of a
//   head are reused from cache by both streams' blocks.
// - Backward: one work item per (b, h, partition of the blocks of both streams). It owns dk, dv, dr of its
//   (b, h) (float32 buffers, one set per partition, summed in a fixed order: partitions only exist when there
//   are fewer (b, h) pairs than 2 x threads) and writes dqu, dqv, dseg of its rows. Per run: P from lse,
//   dS = P (dP - delta), dqu += dS K, dk += dS^T QU, dv += P^T dO, dseg from row sums of dS split by segment;
//   dS scattered onto the band (the transpose of the gather) gives dqv += DPOS r and dr += DPOS^T QV.
#include "relative_attention.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "attention_common.h"

namespace ptm::cpu {
namespace {

using namespace attn;  // NOLINT: the shared attention machinery (attention_common.h, attention_rows.h)

// Keys per GEMM (a run of visible key tiles). The band GEMM is (n + kMaxSpread) / n times the content GEMM, so
// wide runs pay: measured on 2 cores (Zen 4, MKL), 1024 runs ~10% faster than 256, ~4% faster than 512.
constexpr int64_t kChunkN = 1024;
constexpr int64_t kMaxSpread = kTileM;  // position spread of the rows sharing one band GEMM
constexpr int64_t kBandMax = kChunkN + kMaxSpread;

// A [B, H, L, D] CPU tensor of a dtype the kernels take.
void check_heads(const Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 4, "relative_attention: ", what, " must be [B, H, L, D], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "relative_attention (cpu): ", what, " must be a CPU tensor");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "relative_attention (cpu): ", what,
              " must be float32, bfloat16 or float16, got ", dt);
}

// ---------------------------------------------------------------------------------------------- inputs
// k, v, r and the scalars both streams share.
struct Shared {
  int64_t B, H, Lk, R, D, r_offset, q_len;
  float scale;
  Tensor kf, vf, rf;  // float32, unit stride along D
  const int64_t* k_ids = nullptr;  // [B, Lk]
  std::vector<Tensor> keep_alive;

  Shared(const Tensor& k, const Tensor& v, const Tensor& r, const RelativeParams& p) {
    check_heads(k, "k");
    check_heads(v, "v");
    check_heads(r, "r");
    B = k.size(0);
    H = k.size(1);
    Lk = k.size(2);
    D = k.size(3);
    R = r.size(2);
    TORCH_CHECK(v.sizes() == k.sizes(), "relative_attention: v must have k's shape");
    TORCH_CHECK(r.size(0) == B && r.size(1) == H && r.size(3) == D, "relative_attention: r must be [B, H, R, D]");
    r_offset = p.r_offset;
    q_len = p.q_len;
    scale = static_cast<float>(p.scale);
    kf = as_float_rows(k);
    vf = as_float_rows(v);
    rf = as_float_rows(r);
    k_ids = long_ptr(p.k_ids, keep_alive);
  }
};

struct Stream {
  int64_t Lr, nqt;
  Tensor quf, qvf;                     // float32 [B, H, Lr, D], unit stride along D
  const float* seg = nullptr;          // [B, H, Lr, 2]: the segment term (same, other) of each row
  const int64_t* q_ids = nullptr;      // [B, Lr]
  const int64_t* positions = nullptr;  // [B, Lr], or rows at 0, 1, ...
  int64_t pos_shift;                   // Lk - q_len: a position in key coordinates
  VisibleKeys vis;
  DropoutRng dropout;
  std::vector<Tensor> keep_alive;

  Stream(const Shared& S, const RelativeStream& a, const Dropout& drop) {
    check_heads(a.qu, "qu");
    TORCH_CHECK(a.qu.size(0) == S.B && a.qu.size(1) == S.H && a.qu.size(3) == S.D,
                "relative_attention: qu must be [B, H, Lr, D] with k's B, H and D");
    TORCH_CHECK(a.qv.sizes() == a.qu.sizes(), "relative_attention: qv must have qu's shape");
    check_heads(a.qv, "qv");
    Lr = a.qu.size(2);
    nqt = ceil_div(Lr, kTileM);
    quf = as_float_rows(a.qu);
    qvf = as_float_rows(a.qv);
    if (given(a.seg)) {
      TORCH_CHECK(a.seg->sizes() == at::IntArrayRef({S.B, S.H, Lr, 2}),
                  "relative_attention: seg must be [B, H, Lr, 2]");
      TORCH_CHECK(given(a.q_ids) && S.k_ids, "relative_attention: seg needs q_ids and k_ids");
      keep_alive.push_back(a.seg->to(at::kFloat).contiguous());
      seg = keep_alive.back().data_ptr<float>();
      q_ids = long_ptr(a.q_ids, keep_alive);
    }
    if (given(a.positions))
      TORCH_CHECK(a.positions->numel() == S.B * Lr, "relative_attention: positions must be [B, Lr]");
    positions = long_ptr(a.positions, keep_alive);
    pos_shift = S.Lk - S.q_len;
    vis = make_visible_keys("relative_attention", S.B, S.H, Lr, S.Lk, a.vis);
    dropout = DropoutRng(drop);
  }

  // Row i of batch row b in key coordinates.
  int64_t pos(int64_t b, int64_t i) const { return (positions ? positions[b * Lr + i] : i) + pos_shift; }
  std::pair<uint32_t, uint32_t> dropout_keys(int64_t b, int64_t h, int64_t i, int64_t H) const {
    return dropout.row_keys((b * H + h) * Lr + i);
  }
};

// ------------------------------------------------------------------------------------------- row blocks
// Query tile qt of a stream at batch row b: its rows' positions and visible intervals, the statuses of the key
// tiles, and the groups of rows that share one band GEMM. The same for every head.
struct Block {
  int64_t b = 0, i0 = 0, rows = 0, kt_begin = 0, kt_end = 0;
  int64_t pos[kTileM], lo[kTileM], hi[kTileM], base[kTileM];  // base: t = base + j
  std::vector<int8_t> status;     // per key tile
  std::vector<int64_t> group_end;  // the groups are the rows [previous end, end)
};

void plan_block(const Shared& S, const Stream& T, int64_t b, int64_t qt, Block& blk) {
  blk.b = b;
  blk.i0 = qt * kTileM;
  blk.rows = std::min(kTileM, T.Lr - blk.i0);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max(), kMin = std::numeric_limits<int64_t>::min();
  RowSpan span{kMax, kMin, kMax, kMin};
  for (int64_t r = 0; r < blk.rows; ++r) {
    blk.pos[r] = T.pos(b, blk.i0 + r);
    blk.base[r] = S.r_offset - blk.pos[r];
    T.vis.row_range(b, blk.pos[r], blk.lo[r], blk.hi[r]);
    span.lo_min = std::min(span.lo_min, blk.lo[r]);
    span.lo_max = std::max(span.lo_max, blk.lo[r]);
    span.hi_min = std::min(span.hi_min, blk.hi[r]);
    span.hi_max = std::max(span.hi_max, blk.hi[r]);
  }
  blk.kt_begin = span.lo_min / kTileN;
  blk.kt_end = span.hi_max > span.lo_min ? ceil_div(span.hi_max, kTileN) : blk.kt_begin;
  blk.status.assign(T.vis.nkt, 0);
  for (int64_t kt = blk.kt_begin; kt < blk.kt_end; ++kt) {
    const int st = T.vis.tile_status(b, qt, kt, span);
    blk.status[kt] = static_cast<int8_t>(T.vis.dense ? std::min(st, 1) : st);
  }
  blk.group_end.clear();
  for (int64_t r = 0; r < blk.rows;) {
    int64_t lo = blk.pos[r], hi = blk.pos[r];
    for (++r; r < blk.rows; ++r) {
      const int64_t l = std::min(lo, blk.pos[r]), h = std::max(hi, blk.pos[r]);
      if (h - l > kMaxSpread) break;
      lo = l;
      hi = h;
    }
    blk.group_end.push_back(r);
  }
}

struct Workspace {
  Block blk;
  std::vector<float> s, dp, band, o, m, l, dseg;
  std::vector<int64_t> ja, jb;      // per row: the keys of the run with a position term (a row of r)
  std::vector<int64_t> t_lo, t_hi;  // per group: its band of r rows
  ColumnRuns partial;
  explicit Workspace(int64_t D)
      : s(kTileM * kChunkN), dp(kTileM * kChunkN), band(kTileM * kBandMax), o(kTileM * D), m(kTileM), l(kTileM),
        dseg(2 * kTileM), ja(kTileM), jb(kTileM), t_lo(kTileM), t_hi(kTileM) {}
};

// ------------------------------------------------------------------------------------------------ scores
// The scores of the block's rows (head h) for the keys [c0, c1) into ws.s ([rows, n]): content, position and
// segment terms, -inf where hidden; ws.ja/jb and ws.t_lo/t_hi keep the band layout for the backward. Returns
// the factor the scores still need (the scale, folded into the exponential when positive).
float run_scores(const Shared& S, const Stream& T, const Heads& QU, const Heads& QV, const Heads& K,
                 const Heads& Rh, Workspace& ws, int64_t h, int64_t c0, int64_t c1) {
  const Block& blk = ws.blk;
  const int64_t n = c1 - c0, rows = blk.rows, b = blk.b, D = S.D;
  float* s = ws.s.data();
  gemm(mat(s, rows, n, n), mat(QU.row(b, h, blk.i0), rows, D, QU.sl), mat_t(K.row(b, h, c0), n, D, K.sl));

  int64_t g0 = 0;
  for (size_t g = 0; g < blk.group_end.size(); g0 = blk.group_end[g++]) {
    const int64_t g1 = blk.group_end[g];
    int64_t t_lo = std::numeric_limits<int64_t>::max(), t_hi = std::numeric_limits<int64_t>::min();
    for (int64_t r = g0; r < g1; ++r) {  // the keys [ja, jb) the row sees and whose row t of r exists
      ws.ja[r] = std::max({c0, blk.lo[r], -blk.base[r]});
      ws.jb[r] = std::max(ws.ja[r], std::min({c1, blk.hi[r], S.R - blk.base[r]}));
      if (ws.ja[r] == ws.jb[r]) continue;
      t_lo = std::min(t_lo, blk.base[r] + ws.ja[r]);
      t_hi = std::max(t_hi, blk.base[r] + ws.jb[r]);
    }
    ws.t_lo[g] = t_lo;
    ws.t_hi[g] = t_hi;
    if (t_lo >= t_hi) continue;
    const int64_t w = t_hi - t_lo;
    float* pos = ws.band.data();
    gemm(mat(pos, g1 - g0, w, w), mat(QV.row(b, h, blk.i0 + g0), g1 - g0, D, QV.sl),
         mat_t(Rh.row(b, h, t_lo), w, D, Rh.sl));
    for (int64_t r = g0; r < g1; ++r) {  // the row's slice of the band: column t - t_lo, t = base + j
      if (ws.ja[r] == ws.jb[r]) continue;
      add_row(s + r * n + (ws.ja[r] - c0), pos + (r - g0) * w + (blk.base[r] + ws.ja[r] - t_lo),
              ws.jb[r] - ws.ja[r]);
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = blk.i0 + r;
    float* sr = s + r * n;
    if (T.seg) {
      const float* sg = T.seg + ((b * S.H + h) * T.Lr + i) * 2;
      add_segment_term_row(sr, n, S.k_ids + b * S.Lk + c0, T.q_ids[b * T.Lr + i], sg[0], sg[1]);
    }
    if (S.scale <= 0) scale_row(sr, n, S.scale);  // before the mask: only a positive factor keeps -inf and the max
    T.vis.mask_row(sr, b, h, i, blk.pos[r], c0, c1, ws.partial);
  }
  return S.scale > 0 ? S.scale : 1.f;
}

// --------------------------------------------------------------------------------------------- forward
struct StreamOut {
  Tensor out, lse;  // float32 [B, H, Lr, D], [B, H, Lr]
};

void forward_block(const Shared& S, const Stream& T, const StreamOut& Y, Workspace& ws, int64_t b, int64_t h,
                   int64_t qt) {
  const Heads QU(T.quf), QV(T.qvf), K(S.kf), V(S.vf), Rh(S.rf), O(Y.out);
  plan_block(S, T, b, qt, ws.blk);
  const Block& blk = ws.blk;
  const int64_t rows = blk.rows, D = S.D;
  float* o = ws.o.data();
  std::fill(o, o + rows * D, 0.f);
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.f);
  const Tensor o_rows = mat(o, rows, D, D);

  auto run = [&](int64_t c0, int64_t c1) {  // keys [c0, c1): scores, online softmax, dropout, P V
    const int64_t n = c1 - c0;
    const float a = run_scores(S, T, QU, QV, K, Rh, ws, h, c0, c1);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = ws.s.data() + r * n;
      online_softmax_step(sr, n, a, ws.m[r], ws.l[r], o + r * D, D);
      if (T.dropout.on) {
        const auto [k1, k2] = T.dropout_keys(b, h, blk.i0 + r, S.H);
        dropout_row(sr, n, k1, k2, static_cast<uint32_t>(c0), T.dropout.threshold, T.dropout.keep_scale);
      }
    }
    gemm_acc(o_rows, mat(ws.s.data(), rows, n, n), mat(V.row(b, h, c0), n, D, V.sl));
  };
  for_each_key_run(blk.status.data(), blk.kt_begin, blk.kt_end, S.Lk, kChunkN, ws.partial, run);

  float* lse = Y.lse.data_ptr<float>() + (b * S.H + h) * T.Lr;
  for (int64_t r = 0; r < rows; ++r)
    online_softmax_finish(o + r * D, ws.m[r], ws.l[r], D, O.row(b, h, blk.i0 + r), lse + blk.i0 + r);
}

// Every stream's blocks; the items of one (b, h) are consecutive (k, v, r stay in cache), its last blocks (the
// most expensive under a causal mask) first.
std::vector<StreamOut> forward(const Shared& S, const std::vector<const Stream*>& streams) {
  const auto f32 = S.kf.options();
  std::vector<StreamOut> outs;
  struct Item {
    int64_t stream, bh, qt;
  };
  std::vector<Item> items;
  for (const Stream* T : streams)
    outs.push_back({at::empty({S.B, S.H, T->Lr, S.D}, f32), at::empty({S.B, S.H, T->Lr}, f32)});
  for (int64_t bh = 0; bh < S.B * S.H; ++bh)
    for (size_t st = 0; st < streams.size(); ++st)
      for (int64_t qt = streams[st]->nqt - 1; qt >= 0; --qt) items.push_back({int64_t(st), bh, qt});

  const int64_t n_items = static_cast<int64_t>(items.size());
  for_each_worker(n_items, [&](const auto& next) {
    Workspace ws(S.D);
    for (int64_t it; (it = next()) < n_items;) {
      const Item& item = items[it];
      forward_block(S, *streams[item.stream], outs[item.stream], ws, item.bh / S.H, item.bh % S.H, item.qt);
    }
  });
  return outs;
}

// -------------------------------------------------------------------------------------------- backward
struct StreamGrads {
  Tensor dof, delta, lse;  // float32 dO [B, H, Lr, D]; rowsum(dO * O), lse [B, H, Lr]
  Tensor dqu, dqv, dseg;   // float32 [B, H, Lr, D] x 2, [B, H, Lr, 2] (or undefined)
};

// Per partition: dk, dv [parts * B, H, Lk, D], dr [parts * B, H, R, D]; partition `part` adds into batch
// part * B + b.
struct SharedGrads {
  Tensor dk, dv, dr;
};

void backward_block(const Shared& S, const Stream& T, const StreamGrads& G, const SharedGrads& SG, Workspace& ws,
                    int64_t b, int64_t h, int64_t qt, int64_t part) {
  const Heads QU(T.quf), QV(T.qvf), K(S.kf), V(S.vf), Rh(S.rf), dO(G.dof);
  const Heads dQU(G.dqu), dQV(G.dqv), dK(SG.dk), dV(SG.dv), dR(SG.dr);
  plan_block(S, T, b, qt, ws.blk);
  const Block& blk = ws.blk;
  const int64_t rows = blk.rows, D = S.D, i0 = blk.i0, pb = part * S.B + b;
  const int64_t row0 = (b * S.H + h) * T.Lr + i0;  // of the [B, H, Lr] statistics
  const float* lse = G.lse.data_ptr<float>() + row0;
  const float* delta = G.delta.data_ptr<float>() + row0;
  const Tensor qu_rows = mat(QU.row(b, h, i0), rows, D, QU.sl);
  const Tensor do_rows = mat(dO.row(b, h, i0), rows, D, dO.sl);
  const Tensor dqu_rows = mat(dQU.row(b, h, i0), rows, D, dQU.sl);
  std::fill(ws.dseg.begin(), ws.dseg.end(), 0.f);
  float* p = ws.s.data();
  float* ds = ws.dp.data();

  auto run = [&](int64_t c0, int64_t c1) {  // keys [c0, c1)
    const int64_t n = c1 - c0;
    // P = exp(S - lse); a row with no visible key has P = 0
    const float a = run_scores(S, T, QU, QV, K, Rh, ws, h, c0, c1);
    for (int64_t r = 0; r < rows; ++r) exp_row(p + r * n, n, a, lse[r] == kNegInf ? kPosInf : lse[r]);
    // dS = P * (dP - delta), dP = dO V^T (dropout: P and dP through the keep-mask); unscaled
    gemm(mat(ds, rows, n, n), do_rows, mat_t(V.row(b, h, c0), n, D, V.sl));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      float* pr = p + r * n;
      float* dsr = ds + r * n;
      if (T.dropout.on) {
        const auto [k1, k2] = T.dropout_keys(b, h, i, S.H);
        ds_row_dropout(pr, dsr, n, delta[r], k1, k2, static_cast<uint32_t>(c0), T.dropout.threshold,
                       T.dropout.keep_scale);
      } else {
        ds_row(pr, dsr, n, delta[r]);
      }
      if (T.seg) {
        float same, other;
        segment_sums_row(dsr, n, S.k_ids + b * S.Lk + c0, T.q_ids[b * T.Lr + i], &same, &other);
        ws.dseg[2 * r] += same;
        ws.dseg[2 * r + 1] += other;
      }
    }
    gemm_acc(mat(dV.row(pb, h, c0), n, D, dV.sl), mat_t(p, rows, n, n), do_rows);
    gemm_acc(mat(dK.row(pb, h, c0), n, D, dK.sl), mat_t(ds, rows, n, n), qu_rows, S.scale);
    gemm_acc(dqu_rows, mat(ds, rows, n, n), mat(K.row(b, h, c0), n, D, K.sl), S.scale);

    // Position term: dS onto the band of each group, then dqv += DPOS r[band], dr[band] += DPOS^T qv.
    int64_t g0 = 0;
    for (size_t g = 0; g < blk.group_end.size(); g0 = blk.group_end[g++]) {
      const int64_t g1 = blk.group_end[g], t_lo = ws.t_lo[g], t_hi = ws.t_hi[g];
      if (t_lo >= t_hi) continue;
      const int64_t w = t_hi - t_lo;
      float* dpos = ws.band.data();
      std::fill(dpos, dpos + (g1 - g0) * w, 0.f);
      for (int64_t r = g0; r < g1; ++r)
        if (ws.ja[r] < ws.jb[r])
          std::copy(ds + r * n + (ws.ja[r] - c0), ds + r * n + (ws.jb[r] - c0),
                    dpos + (r - g0) * w + (blk.base[r] + ws.ja[r] - t_lo));
      const Tensor band = mat(dpos, g1 - g0, w, w);
      gemm_acc(mat(dQV.row(b, h, i0 + g0), g1 - g0, D, dQV.sl), band, mat(Rh.row(b, h, t_lo), w, D, Rh.sl),
               S.scale);
      gemm_acc(mat(dR.row(pb, h, t_lo), w, D, dR.sl), mat_t(dpos, g1 - g0, w, w),
               mat(QV.row(b, h, i0 + g0), g1 - g0, D, QV.sl), S.scale);
    }
  };
  for_each_key_run(blk.status.data(), blk.kt_begin, blk.kt_end, S.Lk, kChunkN, ws.partial, run);

  if (T.seg) {
    float* dseg = G.dseg.data_ptr<float>() + row0 * 2;
    for (int64_t r = 0; r < 2 * rows; ++r) dseg[r] = ws.dseg[r] * S.scale;
  }
}

// dout, out, lse of one stream -> its gradient buffers.
StreamGrads stream_grads(const Shared& S, const Stream& T, const Tensor& dout, const Tensor& out,
                         const Tensor& lse) {
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == T.quf.sizes(),
              "relative_attention_bwd: dout and out must have qu's shape");
  TORCH_CHECK(lse.numel() == S.B * S.H * T.Lr, "relative_attention_bwd: lse must be [B, H, Lr]");
  const auto f32 = S.kf.options();
  StreamGrads G;
  G.dof = as_float_rows(dout);
  G.delta = (G.dof * out.to(at::kFloat)).sum(-1).contiguous();
  G.lse = lse.to(at::kFloat).contiguous();
  G.dqu = at::zeros({S.B, S.H, T.Lr, S.D}, f32);
  G.dqv = at::zeros({S.B, S.H, T.Lr, S.D}, f32);
  if (T.seg) G.dseg = at::empty({S.B, S.H, T.Lr, 2}, f32);
  return G;
}

// -> dk, dv, dr (float32, summed over the streams); fills each stream's dqu, dqv, dseg.
SharedGrads backward(const Shared& S, const std::vector<const Stream*>& streams,
                     const std::vector<StreamGrads>& grads) {
  struct BlockRef {
    int64_t stream, qt;
  };
  std::vector<BlockRef> blocks;
  for (size_t st = 0; st < streams.size(); ++st)
    for (int64_t qt = 0; qt < streams[st]->nqt; ++qt) blocks.push_back({int64_t(st), qt});
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t pairs = S.B * S.H, threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({n_blocks, ceil_div(2 * threads, pairs), 8}));
  const auto f32 = S.kf.options();
  SharedGrads SG{at::zeros({parts * S.B, S.H, S.Lk, S.D}, f32), at::zeros({parts * S.B, S.H, S.Lk, S.D}, f32),
                 at::zeros({parts * S.B, S.H, S.R, S.D}, f32)};

  // A partition takes every parts-th block (spreading the cost of causal masks evenly).
  const int64_t n_items = pairs * parts;
  for_each_worker(n_items, [&](const auto& next) {
    Workspace ws(S.D);
    for (int64_t it; (it = next()) < n_items;) {
      const int64_t bh = it / parts, part = it % parts;
      for (int64_t k = part; k < n_blocks; k += parts) {
        const BlockRef& blk = blocks[k];
        backward_block(S, *streams[blk.stream], grads[blk.stream], SG, ws, bh / S.H, bh % S.H, blk.qt, part);
      }
    }
  });
  if (parts == 1) return SG;
  // Partitions are summed in a fixed order: the result does not depend on the schedule.
  auto sum = [&](const Tensor& t) { return t.view({parts, S.B, S.H, t.size(2), S.D}).sum(0); };
  return {sum(SG.dk), sum(SG.dv), sum(SG.dr)};
}

Tensor dseg_or_empty(const StreamGrads& G, const Tensor& qu) {
  return G.dseg.defined() ? G.dseg : at::empty({0}, qu.options());
}

// (dq in q's dtype, du, dv_bias) from the float32 gradients of q + u and q + v_bias: dq = dqu + dqv, and a bias's
// gradient is the sum over batch and rows (float32 [H, D]; empty where the bias is None).
std::tuple<Tensor, Tensor, Tensor> query_grads(const StreamGrads& G, const RelativeStream& s) {
  auto bias = [&](const OptTensor& b, const Tensor& d) {
    return b.has_value() && b->defined() ? d.sum({0, 2}) : at::empty({0}, s.q.options());
  };
  return {(G.dqu + G.dqv).to(s.q.scalar_type()), bias(s.u, G.dqu), bias(s.v_bias, G.dqv)};
}

}  // namespace

// ------------------------------------------------------------------------------------------ entry points
namespace {
// The query stream of two-stream attention draws its dropout with seed + 1.
Dropout query_stream_dropout(const Dropout& d) { return {d.p, d.seed + 1}; }
}  // namespace

std::tuple<Tensor, Tensor> relative_attention_fwd(const Tensor& k, const Tensor& v, const Tensor& r,
                                                  const RelativeParams& p, const RelativeStream& s) {
  const Shared S(k, v, r, p);
  const Stream T(S, s, p.dropout);
  const auto outs = forward(S, {&T});
  return {outs[0].out.to(s.qu.scalar_type()), outs[0].lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> relative_attention_bwd(
    const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& k, const Tensor& v, const Tensor& r,
    const RelativeParams& p, const RelativeStream& s) {
  const Shared S(k, v, r, p);
  const Stream T(S, s, p.dropout);
  const std::vector<StreamGrads> grads{stream_grads(S, T, dout, out, lse)};
  const SharedGrads SG = backward(S, {&T}, grads);
  const StreamGrads& G = grads[0];
  const auto [dq, du, dv_bias] = query_grads(G, s);
  return {dq, du, dv_bias, SG.dk.to(k.scalar_type()), SG.dv.to(v.scalar_type()), SG.dr, dseg_or_empty(G, s.qu)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd(const Tensor& k, const Tensor& v, const Tensor& r,
                                                                    const RelativeParams& p, const RelativeStream& c,
                                                                    const RelativeStream& g) {
  const Shared S(k, v, r, p);
  const Stream C(S, c, p.dropout), G(S, g, query_stream_dropout(p.dropout));
  const auto outs = forward(S, {&C, &G});
  return {outs[0].out.to(c.qu.scalar_type()), outs[0].lse, outs[1].out.to(g.qu.scalar_type()), outs[1].lse};
}

TwoStreamGrads two_stream_attention_bwd(
    const Tensor& dout_c, const Tensor& out_c, const Tensor& lse_c, const Tensor& dout_g, const Tensor& out_g,
    const Tensor& lse_g, const Tensor& k, const Tensor& v, const Tensor& r, const RelativeParams& p,
    const RelativeStream& c, const RelativeStream& g) {
  const Shared S(k, v, r, p);
  const Stream C(S, c, p.dropout), G(S, g, query_stream_dropout(p.dropout));
  const std::vector<StreamGrads> grads{stream_grads(S, C, dout_c, out_c, lse_c),
                                       stream_grads(S, G, dout_g, out_g, lse_g)};
  const SharedGrads SG = backward(S, {&C, &G}, grads);
  const StreamGrads &gc = grads[0], &gg = grads[1];
  const auto [dq_c, du_c, dvb_c] = query_grads(gc, c);
  const auto [dq_g, du_g, dvb_g] = query_grads(gg, g);
  return {dq_c, du_c, dvb_c, dseg_or_empty(gc, c.qu), dq_g, du_g, dvb_g, dseg_or_empty(gg, g.qu),
          SG.dk.to(k.scalar_type()), SG.dv.to(v.scalar_type()), SG.dr};
}

}  // namespace ptm::cpu
