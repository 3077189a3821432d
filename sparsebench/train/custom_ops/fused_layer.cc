// sparsebench's fused sparse layer: online max-normalization, per-feature bias and
// sp @ W in one pass over a batch's entries, its gradient, and the SGD and Lazy Adam
// updates applied straight from the output gradient (never materializing the
// [nnz, out_dim] gradient of W).
//
// A batch arrives as three [nnz] vectors in canonical row-major order: rows (the example
// of each entry, ascending), keys (the feature, a row of W) and values.
//
// Threads: every op runs on TensorFlow's intra-op pool (the cell's intra_op_threads).
// The forward pass splits examples among threads (each writes its own output rows), the
// gradient splits entries (each writes its own slice), and the updates split keys: thread
// t of T owns the keys that hash to shard t, groups their entries by key and alone writes
// their rows, once per key, so within one op no two threads touch one row. Each key's
// entries are summed in batch order whatever T is, so the result does not depend on the
// number of threads (and with one intra-op thread the whole op is serial, hence
// deterministic).
//
// Races that are allowed: variables are locked in shared mode, as TensorFlow's own
// scatter ops lock float variables, so two train steps running at once (Hogwild workers)
// may read a row while the other writes it, or interleave their updates of one row. Each
// update adds a gradient computed at slightly stale weights; with sparse batches two
// steps rarely share a row, and SGD stays correct in expectation (Niu et al., 2011,
// "Hogwild!"). The max-normalization update is a max: applied in any order it converges
// to the same value, so a lost race only delays it by a step.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sparsebench {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::Var;
using tensorflow::core::RefCountPtr;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace errors = tensorflow::errors;

// ---------------------------------------------------------------------------------
// Registration.

// The out_dim of the table behind a resource handle, where shape inference knows it.
static tensorflow::shape_inference::DimensionHandle TableCols(InferenceContext* c) {
  auto* handle_data = c->input_handle_shapes_and_types(0);
  if (handle_data != nullptr && !handle_data->empty() && c->RankKnown((*handle_data)[0].shape)) {
    return c->Dim((*handle_data)[0].shape, 1);
  }
  return c->UnknownDim();
}

REGISTER_OP("SparsebenchFusedLayer")
    .Input("table: resource")
    .Input("bias_x: resource")
    .Input("max_x: resource")
    .Input("rows: int64")
    .Input("keys: int64")
    .Input("values: float")
    .Input("batch_size: int64")
    .Attr("normalize: bool = true")
    .Attr("training: bool = true")
    .Attr("epsilon: float = 1e-5")
    .Output("out: float")
    .Output("normalized: float")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Matrix(c->UnknownDim(), TableCols(c)));
      c->set_output(1, c->input(5));
      return absl::OkStatus();
    })
    .Doc(R"doc(
out[b] = sum over the entries e of example b of normalized[e] * table[keys[e]], with
normalized[e] = values[e] / max(max_x[keys[e]], epsilon) + bias_x[keys[e]] (or values[e]
when normalize is false). When training, max_x[k] = max(max_x[k], |v|) over the batch
first. No gradient flows through the scale.
)doc");

REGISTER_OP("SparsebenchFusedLayerGrad")
    .Input("table: resource")
    .Input("rows: int64")
    .Input("keys: int64")
    .Input("normalized: float")
    .Input("grad_out: float")
    .Output("table_grad: float")
    .Output("bias_grad: float")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Matrix(c->Dim(c->input(2), 0), TableCols(c)));
      c->set_output(1, c->Vector(c->Dim(c->input(2), 0)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The slices of the gradient of table and bias_x, one per entry (as IndexedSlices values
with indices keys): table_grad[e] = normalized[e] * grad_out[rows[e]],
bias_grad[e] = dot(table[keys[e]], grad_out[rows[e]]).
)doc");

REGISTER_OP("SparsebenchFusedSgdUpdate")
    .Input("table: resource")
    .Input("bias_x: resource")
    .Input("rows: int64")
    .Input("keys: int64")
    .Input("normalized: float")
    .Input("grad_out: float")
    .Input("learning_rate: float")
    .Attr("normalize: bool = true")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) { return absl::OkStatus(); })
    .Doc("SGD on table and bias_x straight from grad_out: each entry's gradient is applied to its row.");

REGISTER_OP("SparsebenchFusedLazyAdamUpdate")
    .Input("table: resource")
    .Input("table_m: resource")
    .Input("table_v: resource")
    .Input("bias_x: resource")
    .Input("bias_m: resource")
    .Input("bias_v: resource")
    .Input("rows: int64")
    .Input("keys: int64")
    .Input("normalized: float")
    .Input("grad_out: float")
    .Input("learning_rate: float")
    .Input("beta1: float")
    .Input("beta2: float")
    .Input("epsilon: float")
    .Input("beta1_power: float")
    .Input("beta2_power: float")
    .Attr("normalize: bool = true")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) { return absl::OkStatus(); })
    .Doc(R"doc(
Lazy Adam straight from grad_out: each distinct key's gradient is summed over its entries,
then its row of table, m and v (and of bias_x and its moments) is updated once; rows of
keys absent from the batch are not touched.
)doc");

// ---------------------------------------------------------------------------------
// Helpers.

// A resource variable's float tensor, checked to be [rows, cols] (cols = 0: a vector).
static tensorflow::Status Table(OpKernelContext* ctx, int input, RefCountPtr<Var>* var, int rank) {
  TF_RETURN_IF_ERROR(tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, input), var));
  Tensor* t = (*var)->tensor();
  if (!(*var)->is_initialized) return errors::FailedPrecondition("input ", input, ": variable is not initialized");
  if (t->dtype() != tensorflow::DT_FLOAT) return errors::InvalidArgument("input ", input, ": variable must be float32");
  if (t->dims() != rank) return errors::InvalidArgument("input ", input, ": variable must have rank ", rank);
  return absl::OkStatus();
}

// Before writing a variable in place: if another tensor still shares its buffer (a read
// that is alive), give the variable a copy first, as TensorFlow's sparse updates do.
static tensorflow::Status OwnBuffer(OpKernelContext* ctx, Var* var) {
  tensorflow::mutex_lock lock(*var->mu());
  if (var->tensor()->RefCountIsOne()) return absl::OkStatus();
  Tensor copy;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(var->tensor()->dtype(), var->tensor()->shape(), &copy));
  std::memcpy(copy.data(), var->tensor()->data(), var->tensor()->TotalBytes());
  *var->tensor() = copy;
  var->copy_on_read_mode.store(true);
  return absl::OkStatus();
}

// A variable the op is about to write in place: looked up, checked, and its buffer its own.
static tensorflow::Status WritableTable(OpKernelContext* ctx, int input, RefCountPtr<Var>* var, int rank) {
  TF_RETURN_IF_ERROR(Table(ctx, input, var, rank));
  return OwnBuffer(ctx, var->get());
}

struct Batch {
  const int64_t* rows;
  const int64_t* keys;
  int64_t nnz;
};

static tensorflow::Status ReadBatch(OpKernelContext* ctx, int rows_input, int64_t num_keys, Batch* batch) {
  const Tensor& rows = ctx->input(rows_input);
  const Tensor& keys = ctx->input(rows_input + 1);
  if (rows.dims() != 1 || keys.dims() != 1 || rows.NumElements() != keys.NumElements()) {
    return errors::InvalidArgument("rows and keys must be vectors of the same length");
  }
  batch->rows = rows.flat<int64_t>().data();
  batch->keys = keys.flat<int64_t>().data();
  batch->nnz = keys.NumElements();
  for (int64_t e = 0; e < batch->nnz; ++e) {
    if (batch->keys[e] < 0 || batch->keys[e] >= num_keys) {
      return errors::InvalidArgument("keys[", e, "] = ", batch->keys[e], " is not in [0, ", num_keys, ")");
    }
    if (e > 0 && batch->rows[e] < batch->rows[e - 1]) {
      return errors::InvalidArgument("rows must be in ascending order (row-major batch); rows[", e, "] = ",
                                     batch->rows[e], " < ", batch->rows[e - 1]);
    }
  }
  return absl::OkStatus();
}

static void ParallelFor(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& work) {
  auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, total, cost_per_unit, work);
}

// How many keys ahead an update prefetches the rows it will write.
constexpr int64_t kGroupsAhead = 4;

// Where a key lives: a multiplicative hash (Fibonacci hashing) whose high bits pick the
// shard and whose low bits probe the shard's table, so both are cheap and independent.
static inline uint64_t KeyHash(int64_t key) { return static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull; }
static inline int64_t ShardOf(uint64_t hash, int64_t shards) {
  return static_cast<int64_t>(((hash >> 32) * static_cast<uint64_t>(shards)) >> 32);
}

// Brings the cache lines of a row of `bytes` bytes towards the core before it is needed:
// the rows of a 2^20-row table are scattered across hundreds of megabytes, so without this
// every row costs a full memory latency.
static inline void PrefetchRow(const float* row, int64_t bytes, bool write) {
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    if (write) {
      __builtin_prefetch(reinterpret_cast<const char*>(row) + offset, 1, 1);
    } else {
      __builtin_prefetch(reinterpret_cast<const char*>(row) + offset, 0, 1);
    }
  }
}

// The entries of a batch grouped by key, for the updates: each distinct key once, with the
// indices of its entries in batch order. Keys are split into T shards (T = the intra-op
// pool's size) by hash; thread t alone groups and updates shard t's keys, so within one op
// no two threads write one row, no [nnz, out_dim] buffer exists, and since each key's
// entries are summed in batch order whatever T is, the result does not depend on T.
//
// ForEachKeyGroup calls per_key(key, entries, count, next_key) once per distinct key, on
// the thread that owns it; next_key is the key that thread handles kGroupsAhead keys later
// (-1 near the end), for prefetching.
template <typename PerKey>
static void ForEachKeyGroup(OpKernelContext* ctx, const Batch& batch, PerKey per_key) {
  const int64_t shards = std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
  // Partition the entries by shard, keeping batch order within each (a counting sort).
  std::vector<int64_t> shard_begin(shards + 1, 0);
  std::vector<int32_t> by_shard(batch.nnz);
  {
    std::vector<int32_t> shard_of(batch.nnz);
    for (int64_t e = 0; e < batch.nnz; ++e) {
      shard_of[e] = static_cast<int32_t>(ShardOf(KeyHash(batch.keys[e]), shards));
      ++shard_begin[shard_of[e] + 1];
    }
    for (int64_t s = 0; s < shards; ++s) shard_begin[s + 1] += shard_begin[s];
    std::vector<int64_t> fill(shard_begin.begin(), shard_begin.end() - 1);
    for (int64_t e = 0; e < batch.nnz; ++e) by_shard[fill[shard_of[e]]++] = static_cast<int32_t>(e);
  }
  ParallelFor(ctx, shards, 1 << 30, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const int32_t* entries = by_shard.data() + shard_begin[s];
      const int64_t count = shard_begin[s + 1] - shard_begin[s];
      if (count == 0) continue;
      // Open addressing, capacity a power of two at least twice the entries: key -> group.
      int bits = 1;
      while ((int64_t{1} << bits) < 2 * count) ++bits;
      const uint64_t mask = (uint64_t{1} << bits) - 1;
      std::vector<int64_t> slot_key(mask + 1, -1);
      std::vector<int32_t> slot_group(mask + 1);
      std::vector<int64_t> group_key;
      std::vector<int32_t> group_size;
      std::vector<int32_t> group_of(count);
      group_key.reserve(count);
      group_size.reserve(count);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t key = batch.keys[entries[i]];
        uint64_t slot = KeyHash(key) & mask;
        while (slot_key[slot] != -1 && slot_key[slot] != key) slot = (slot + 1) & mask;
        if (slot_key[slot] == -1) {
          slot_key[slot] = key;
          slot_group[slot] = static_cast<int32_t>(group_key.size());
          group_key.push_back(key);
          group_size.push_back(0);
        }
        group_of[i] = slot_group[slot];
        ++group_size[group_of[i]];
      }
      const int64_t groups = static_cast<int64_t>(group_key.size());
      std::vector<int32_t> group_begin(groups + 1, 0);
      for (int64_t g = 0; g < groups; ++g) group_begin[g + 1] = group_begin[g] + group_size[g];
      std::vector<int32_t> order(count);
      std::vector<int32_t> cursor(group_begin.begin(), group_begin.end() - 1);
      for (int64_t i = 0; i < count; ++i) order[cursor[group_of[i]]++] = entries[i];
      for (int64_t g = 0; g < groups; ++g) {
        per_key(group_key[g], order.data() + group_begin[g], static_cast<int64_t>(group_begin[g + 1] - group_begin[g]),
                g + kGroupsAhead < groups ? group_key[g + kGroupsAhead] : -1);
      }
    }
  });
}

// How many entries ahead the forward pass prefetches a row (enough to cover a memory
// latency at a few nanoseconds of work per entry).
constexpr int64_t kPrefetchAhead = 4;

// Rows up to this many columns sum their gradient on the stack.
constexpr int64_t kMaxInlineCols = 256;

static inline float Dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// Scratch for one key's row gradient: on the stack up to kMaxInlineCols columns.
class RowScratch {
 public:
  explicit RowScratch(int64_t cols) : heap_(cols > kMaxInlineCols ? cols : 0) {}
  float* data() { return heap_.empty() ? inline_ : heap_.data(); }

 private:
  float inline_[kMaxInlineCols];
  std::vector<float> heap_;
};

// One key's gradients, summed over its entries in batch order from the rows of the
// output gradient: its row's into gw (cols floats), its bias's returned (when with_bias).
// Reads the row as the forward pass saw it, so call it before the row is written.
static inline float SumKeyGradient(const float* row, const int32_t* entries, int64_t count, const int64_t* rows,
                                   const float* n, const float* g, int64_t cols, bool with_bias, float* gw) {
  std::fill(gw, gw + cols, 0.0f);
  float grad_b = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = entries[i];
    const float* go = g + rows[e] * cols;
    if (with_bias) grad_b += Dot(row, go, cols);
    const float ne = n[e];
    for (int64_t j = 0; j < cols; ++j) gw[j] += ne * go[j];
  }
  return grad_b;
}

// ---------------------------------------------------------------------------------
// Forward.

class FusedLayerOp : public OpKernel {
 public:
  explicit FusedLayerOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("normalize", &normalize_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("training", &training_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    RefCountPtr<Var> table, bias, maxima;
    OP_REQUIRES_OK(ctx, Table(ctx, 0, &table, 2));
    if (normalize_) {
      OP_REQUIRES_OK(ctx, Table(ctx, 1, &bias, 1));
      OP_REQUIRES_OK(ctx, Table(ctx, 2, &maxima, 1));
    }
    tensorflow::tf_shared_lock table_lock(*table->mu());
    const Tensor& w = *table->tensor();
    const int64_t num_keys = w.dim_size(0), cols = w.dim_size(1);
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 3, num_keys, &batch));
    const Tensor& values = ctx->input(5);
    OP_REQUIRES(ctx, values.NumElements() == batch.nnz, errors::InvalidArgument("values must have one per key"));
    const int64_t batch_size = ctx->input(6).scalar<int64_t>()();
    OP_REQUIRES(ctx, batch.nnz == 0 || batch.rows[batch.nnz - 1] < batch_size,
                errors::InvalidArgument("rows must be < batch_size (", batch_size, ")"));
    if (normalize_) {
      OP_REQUIRES(ctx, bias->tensor()->dim_size(0) == num_keys && maxima->tensor()->dim_size(0) == num_keys,
                  errors::InvalidArgument("bias_x and max_x must have one entry per row of table"));
    }

    Tensor* out = nullptr;
    Tensor* normalized = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch_size, cols}), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch.nnz}), &normalized));
    const float* v = values.flat<float>().data();
    float* n = normalized->flat<float>().data();

    if (normalize_) {
      tensorflow::tf_shared_lock bias_lock(*bias->mu());
      tensorflow::tf_shared_lock max_lock(*maxima->mu());
      float* max_x = maxima->tensor()->flat<float>().data();
      const float* bias_x = bias->tensor()->flat<float>().data();
      if (training_) {  // the whole batch's maxima first, then the division (per-batch semantics)
        for (int64_t e = 0; e < batch.nnz; ++e) {
          const float a = std::fabs(v[e]);
          if (a > max_x[batch.keys[e]]) max_x[batch.keys[e]] = a;
        }
      }
      ParallelFor(ctx, batch.nnz, 16, [&](int64_t first, int64_t last) {
        for (int64_t e = first; e < last; ++e) {
          const int64_t k = batch.keys[e];
          n[e] = v[e] / std::max(max_x[k], epsilon_) + bias_x[k];
        }
      });
    } else {
      std::memcpy(n, v, batch.nnz * sizeof(float));
    }

    // Where each example's entries start: rows are ascending.
    std::vector<int64_t> starts(batch_size + 1, batch.nnz);
    for (int64_t e = batch.nnz - 1; e >= 0; --e) starts[batch.rows[e]] = e;
    for (int64_t b = batch_size - 1; b >= 0; --b) starts[b] = std::min(starts[b], starts[b + 1]);

    const float* table_data = w.flat<float>().data();
    float* out_data = out->flat<float>().data();
    const int64_t per_example = batch_size ? std::max<int64_t>(1, batch.nnz / batch_size) : 1;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    ParallelFor(ctx, batch_size, per_example * cols * 4, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        float* o = out_data + b * cols;
        std::fill(o, o + cols, 0.0f);
        for (int64_t e = starts[b]; e < starts[b + 1]; ++e) {
          if (e + kPrefetchAhead < batch.nnz) PrefetchRow(table_data + batch.keys[e + kPrefetchAhead] * cols, row_bytes, false);
          const float* row = table_data + batch.keys[e] * cols;
          const float scale = n[e];
          for (int64_t j = 0; j < cols; ++j) o[j] += scale * row[j];
        }
      }
    });
  }

 private:
  bool normalize_;
  bool training_;
  float epsilon_;
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchFusedLayer").Device(DEVICE_CPU), FusedLayerOp);

// ---------------------------------------------------------------------------------
// Gradient (for optimizers that take IndexedSlices).

class FusedLayerGradOp : public OpKernel {
 public:
  explicit FusedLayerGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    RefCountPtr<Var> table;
    OP_REQUIRES_OK(ctx, Table(ctx, 0, &table, 2));
    tensorflow::tf_shared_lock table_lock(*table->mu());
    const Tensor& w = *table->tensor();
    const int64_t num_keys = w.dim_size(0), cols = w.dim_size(1);
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 1, num_keys, &batch));
    const float* n = ctx->input(3).flat<float>().data();
    const Tensor& grad_out = ctx->input(4);
    OP_REQUIRES(ctx, grad_out.dims() == 2 && grad_out.dim_size(1) == cols,
                errors::InvalidArgument("grad_out must be [batch_size, ", cols, "]"));
    OP_REQUIRES(ctx, batch.nnz == 0 || batch.rows[batch.nnz - 1] < grad_out.dim_size(0),
                errors::InvalidArgument("rows must be < batch_size"));
    Tensor* table_grad = nullptr;
    Tensor* bias_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch.nnz, cols}), &table_grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch.nnz}), &bias_grad));
    const float* g = grad_out.flat<float>().data();
    const float* table_data = w.flat<float>().data();
    float* tg = table_grad->flat<float>().data();
    float* bg = bias_grad->flat<float>().data();
    ParallelFor(ctx, batch.nnz, cols * 4, [&](int64_t first, int64_t last) {
      for (int64_t e = first; e < last; ++e) {
        const float* go = g + batch.rows[e] * cols;
        float* out = tg + e * cols;
        for (int64_t j = 0; j < cols; ++j) out[j] = n[e] * go[j];
        bg[e] = Dot(table_data + batch.keys[e] * cols, go, cols);
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchFusedLayerGrad").Device(DEVICE_CPU), FusedLayerGradOp);

// ---------------------------------------------------------------------------------
// Fused updates: both read the `normalize` attribute (whether bias_x is updated too).

class FusedUpdateOp : public OpKernel {
 public:
  explicit FusedUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("normalize", &normalize_));
  }

 protected:
  bool normalize_;
};

// ---------------------------------------------------------------------------------
// Fused SGD.

class FusedSgdUpdateOp : public FusedUpdateOp {
 public:
  using FusedUpdateOp::FusedUpdateOp;

  void Compute(OpKernelContext* ctx) override {
    RefCountPtr<Var> table, bias;
    OP_REQUIRES_OK(ctx, WritableTable(ctx, 0, &table, 2));
    if (normalize_) OP_REQUIRES_OK(ctx, WritableTable(ctx, 1, &bias, 1));
    tensorflow::tf_shared_lock table_lock(*table->mu());
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 2, num_keys, &batch));
    const float* n = ctx->input(4).flat<float>().data();
    const float* g = ctx->input(5).flat<float>().data();
    const float lr = ctx->input(6).scalar<float>()();
    float* w = table->tensor()->flat<float>().data();
    float* b = normalize_ ? bias->tensor()->flat<float>().data() : nullptr;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    ForEachKeyGroup(ctx, batch, [&](int64_t k, const int32_t* entries, int64_t count, int64_t next_key) {
      if (next_key >= 0) PrefetchRow(w + next_key * cols, row_bytes, true);
      // The key's gradients, summed over its entries before the row changes: the bias
      // gradient reads the weights the forward pass used.
      float* row = w + k * cols;
      RowScratch scratch(cols);
      float* gw = scratch.data();
      const float grad_b = SumKeyGradient(row, entries, count, batch.rows, n, g, cols, b != nullptr, gw);
      for (int64_t j = 0; j < cols; ++j) row[j] -= lr * gw[j];
      if (b != nullptr) b[k] -= lr * grad_b;
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchFusedSgdUpdate").Device(DEVICE_CPU), FusedSgdUpdateOp);

// ---------------------------------------------------------------------------------
// Fused Lazy Adam.

class FusedLazyAdamUpdateOp : public FusedUpdateOp {
 public:
  using FusedUpdateOp::FusedUpdateOp;

  void Compute(OpKernelContext* ctx) override {
    RefCountPtr<Var> table, table_m, table_v, bias, bias_m, bias_v;
    OP_REQUIRES_OK(ctx, WritableTable(ctx, 0, &table, 2));
    OP_REQUIRES_OK(ctx, WritableTable(ctx, 1, &table_m, 2));
    OP_REQUIRES_OK(ctx, WritableTable(ctx, 2, &table_v, 2));
    if (normalize_) {
      OP_REQUIRES_OK(ctx, WritableTable(ctx, 3, &bias, 1));
      OP_REQUIRES_OK(ctx, WritableTable(ctx, 4, &bias_m, 1));
      OP_REQUIRES_OK(ctx, WritableTable(ctx, 5, &bias_v, 1));
    }
    tensorflow::tf_shared_lock table_lock(*table->mu());
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    OP_REQUIRES(ctx, table_m->tensor()->shape() == table->tensor()->shape() &&
                         table_v->tensor()->shape() == table->tensor()->shape(),
                errors::InvalidArgument("the moments must have the table's shape"));
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 6, num_keys, &batch));
    const float* n = ctx->input(8).flat<float>().data();
    const float* g = ctx->input(9).flat<float>().data();
    const float lr = ctx->input(10).scalar<float>()();
    const float beta1 = ctx->input(11).scalar<float>()();
    const float beta2 = ctx->input(12).scalar<float>()();
    const float epsilon = ctx->input(13).scalar<float>()();
    const float beta1_power = ctx->input(14).scalar<float>()();
    const float beta2_power = ctx->input(15).scalar<float>()();
    const float lr_t = lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power);
    float* w = table->tensor()->flat<float>().data();
    float* m = table_m->tensor()->flat<float>().data();
    float* v = table_v->tensor()->flat<float>().data();
    float* b = normalize_ ? bias->tensor()->flat<float>().data() : nullptr;
    float* bm = normalize_ ? bias_m->tensor()->flat<float>().data() : nullptr;
    float* bv = normalize_ ? bias_v->tensor()->flat<float>().data() : nullptr;

    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    ForEachKeyGroup(ctx, batch, [&](int64_t k, const int32_t* entries, int64_t count, int64_t next_key) {
      if (next_key >= 0) {
        PrefetchRow(w + next_key * cols, row_bytes, true);
        PrefetchRow(m + next_key * cols, row_bytes, true);
        PrefetchRow(v + next_key * cols, row_bytes, true);
      }
      // The key's gradient summed over its entries (weights as the forward pass saw
      // them: the row is written only after), then one Adam update of its row and moments.
      float* row = w + k * cols;
      RowScratch scratch(cols);
      float* gw = scratch.data();
      const float gb = SumKeyGradient(row, entries, count, batch.rows, n, g, cols, b != nullptr, gw);
      float* mr = m + k * cols;
      float* vr = v + k * cols;
      for (int64_t j = 0; j < cols; ++j) {
        mr[j] = beta1 * mr[j] + (1.0f - beta1) * gw[j];
        vr[j] = beta2 * vr[j] + (1.0f - beta2) * gw[j] * gw[j];
        row[j] -= lr_t * mr[j] / (std::sqrt(vr[j]) + epsilon);
      }
      if (b != nullptr) {
        bm[k] = beta1 * bm[k] + (1.0f - beta1) * gb;
        bv[k] = beta2 * bv[k] + (1.0f - beta2) * gb * gb;
        b[k] -= lr_t * bm[k] / (std::sqrt(bv[k]) + epsilon);
      }
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchFusedLazyAdamUpdate").Device(DEVICE_CPU), FusedLazyAdamUpdateOp);

}  // namespace sparsebench
