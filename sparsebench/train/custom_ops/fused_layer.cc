// sparsebench's fused sparse layer: online max-normalization, per-feature bias and
// sp @ W in one pass over a batch's entries, its gradient, and the SGD and Lazy Adam
// updates applied straight from the output gradient (never materializing the
// [nnz, out_dim] gradient of W). Also the memory bound of a cell's key stream
// (SparsebenchMemoryBound): the same rows read and written with no arithmetic to speak of.
//
// A batch arrives as three [nnz] vectors in canonical row-major order: rows (the example
// of each entry, ascending), keys (the feature, a row of W) and values.
//
// Inputs are never trusted: every op checks every input's shape and every row and key
// against the tensors it indexes before it reads or writes anything (in parallel), and
// answers a bad one with InvalidArgument naming the input and the first bad entry.
// Entries are indexed with 32 bits inside the updates, so a batch holds at most 2^31 - 1.
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
// Variables: written as TensorFlow's own sparse updates write them
// (`EnsureSparseVariableAccess`, training_op_helpers.h): the first write puts the variable
// in copy-on-read mode (a tensor read from it afterwards is a copy, never the buffer being
// written; a read still sharing the buffer at that moment gets the old buffer), then every
// variable an op reads or writes is locked in shared mode, in address order, as
// TensorFlow's scatter ops lock float variables. So two train steps running at once
// (Hogwild workers) may read a row while the other writes it, or interleave their updates
// of one row: each update adds a gradient computed at slightly stale weights, which SGD
// tolerates (Niu et al., 2011, "Hogwild!"). The one update that must not be lost is the
// normalization's maximum (a lost race would lower it): it is a compare-and-swap on the
// float's bits, so max_x never decreases.
//
// Non-finite values are not refused (the stock ops accept them too): a NaN value skips the
// max update and makes its example's output, gradient and rows NaN; an infinite value sets
// its key's maximum to inf. The worker counts them in every record (`nonfinite_inputs`).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sparsebench {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::Var;
using tensorflow::core::RefCountPtr;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace errors = tensorflow::errors;
using Status = absl::Status;

// The most entries one batch may hold: the updates index entries with int32.
constexpr int64_t kMaxEntries = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------
// Registration.

// The out_dim of the table behind a resource handle, where shape inference knows it.
static DimensionHandle TableCols(InferenceContext* c) {
  auto* handle_data = c->input_handle_shapes_and_types(0);
  if (handle_data != nullptr && !handle_data->empty() && c->RankKnown((*handle_data)[0].shape)) {
    return c->Dim((*handle_data)[0].shape, 1);
  }
  return c->UnknownDim();
}

// Shape inference's share of the checks: ranks, and a batch too long for 32-bit entry
// indices, refused when the graph is built (where the length is known then).
static Status EntryVector(InferenceContext* c, int input, const char* name, ShapeHandle* shape) {
  Status s = c->WithRank(c->input(input), 1, shape);
  if (!s.ok()) return errors::InvalidArgument(name, " must be a vector: ", s.message());
  DimensionHandle n = c->Dim(*shape, 0);
  if (c->ValueKnown(n) && c->Value(n) > kMaxEntries) {
    return errors::InvalidArgument(name, " has ", c->Value(n), " entries; the op indexes entries with 32 bits (at most ",
                                   kMaxEntries, ")");
  }
  return absl::OkStatus();
}

static Status ScalarInputs(InferenceContext* c, int first, int last) {
  ShapeHandle unused;
  for (int i = first; i <= last; ++i) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  return absl::OkStatus();
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
      ShapeHandle rows, keys, values;
      TF_RETURN_IF_ERROR(EntryVector(c, 3, "rows", &rows));
      TF_RETURN_IF_ERROR(EntryVector(c, 4, "keys", &keys));
      TF_RETURN_IF_ERROR(EntryVector(c, 5, "values", &values));
      TF_RETURN_IF_ERROR(ScalarInputs(c, 6, 6));
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
      ShapeHandle rows, keys, normalized, grad_out;
      TF_RETURN_IF_ERROR(EntryVector(c, 1, "rows", &rows));
      TF_RETURN_IF_ERROR(EntryVector(c, 2, "keys", &keys));
      TF_RETURN_IF_ERROR(EntryVector(c, 3, "normalized", &normalized));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &grad_out));
      c->set_output(0, c->Matrix(c->Dim(keys, 0), TableCols(c)));
      c->set_output(1, c->Vector(c->Dim(keys, 0)));
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
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle rows, keys, normalized, grad_out;
      TF_RETURN_IF_ERROR(EntryVector(c, 2, "rows", &rows));
      TF_RETURN_IF_ERROR(EntryVector(c, 3, "keys", &keys));
      TF_RETURN_IF_ERROR(EntryVector(c, 4, "normalized", &normalized));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &grad_out));
      return ScalarInputs(c, 6, 6);
    })
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
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle rows, keys, normalized, grad_out;
      TF_RETURN_IF_ERROR(EntryVector(c, 6, "rows", &rows));
      TF_RETURN_IF_ERROR(EntryVector(c, 7, "keys", &keys));
      TF_RETURN_IF_ERROR(EntryVector(c, 8, "normalized", &normalized));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(9), 2, &grad_out));
      return ScalarInputs(c, 10, 15);
    })
    .Doc(R"doc(
Lazy Adam straight from grad_out: each distinct key's gradient is summed over its entries,
then its row of table, m and v (and of bias_x and its moments) is updated once; rows of
keys absent from the batch are not touched.
)doc");

REGISTER_OP("SparsebenchMemoryBound")
    .Input("rows: int64")
    .Input("keys: int64")
    .Input("batch_splits: int64")
    .Input("unique_keys: int64")
    .Input("unique_splits: int64")
    .Input("num_keys: int64")
    .Input("cols: int64")
    .Input("row_tables: int64")
    .Input("dense_update: bool")
    .Input("normalize: bool")
    .Input("passes: int64")
    .Output("pass_seconds: double")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle rows, keys;
      TF_RETURN_IF_ERROR(EntryVector(c, 0, "rows", &rows));
      TF_RETURN_IF_ERROR(EntryVector(c, 1, "keys", &keys));
      TF_RETURN_IF_ERROR(ScalarInputs(c, 5, 10));
      c->set_output(0, c->Vector(c->UnknownDim()));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The memory traffic of a cell's layer alone, timed: `passes` replays of a key stream of
several batches (batch i: entries batch_splits[i]..batch_splits[i+1] of rows/keys, its
distinct keys unique_splits[i]..unique_splits[i+1] of unique_keys) on tables of its own
([num_keys, cols] each, row_tables of them: 1 for SGD, 3 for Adam). Per batch: the
forward reads each entry's row (and with normalize its max and bias) into its example's
output row, split by example over the intra-op pool; the update reads and writes each
distinct key's row in every table (and with normalize its per-key scalars), split by key,
or with dense_update every row of every table. Returns each pass's wall seconds.
)doc");

// ---------------------------------------------------------------------------------
// Checking inputs.

static std::string ShapeText(const Tensor& t) { return t.shape().DebugString(); }

// A scalar input's value, or InvalidArgument naming it.
template <typename T>
static Status ScalarInput(OpKernelContext* ctx, int input, const char* name, T* value) {
  const Tensor& t = ctx->input(input);
  if (!TensorShapeUtils::IsScalar(t.shape())) {
    return errors::InvalidArgument(name, " must be a scalar, got shape ", ShapeText(t));
  }
  *value = t.scalar<T>()();
  return absl::OkStatus();
}

// A vector input of `length` entries (length < 0: any), or InvalidArgument naming it.
static Status VectorInput(OpKernelContext* ctx, int input, const char* name, int64_t length) {
  const Tensor& t = ctx->input(input);
  if (!TensorShapeUtils::IsVector(t.shape())) {
    return errors::InvalidArgument(name, " must be a vector, got shape ", ShapeText(t));
  }
  if (t.NumElements() > kMaxEntries) {
    return errors::InvalidArgument(name, " has ", t.NumElements(),
                                   " entries; the op indexes entries with 32 bits (at most ", kMaxEntries, ")");
  }
  if (length >= 0 && t.NumElements() != length) {
    return errors::InvalidArgument(name, " must have one entry per entry of rows (", length, "), got shape ", ShapeText(t));
  }
  return absl::OkStatus();
}

// A resource variable's float tensor, checked to be of the given rank and, where given
// (>= 0), of `rows` rows and `cols` columns.
static Status Variable(OpKernelContext* ctx, int input, const char* name, int rank, int64_t rows, int64_t cols,
                       RefCountPtr<Var>* var) {
  TF_RETURN_IF_ERROR(tensorflow::LookupResource(ctx, tensorflow::HandleFromInput(ctx, input), var));
  if (!(*var)->is_initialized) return errors::FailedPrecondition(name, ": variable is not initialized");
  const Tensor* t = (*var)->tensor();
  if (t->dtype() != tensorflow::DT_FLOAT) return errors::InvalidArgument(name, ": variable must be float32");
  if (t->dims() != rank) {
    return errors::InvalidArgument(name, ": variable must have rank ", rank, ", got shape ", ShapeText(*t));
  }
  if ((rows >= 0 && t->dim_size(0) != rows) || (rank == 2 && cols >= 0 && t->dim_size(1) != cols)) {
    return errors::InvalidArgument(name, ": variable must have shape [", rows, rank == 2 ? ", " : "",
                                   rank == 2 ? std::to_string(cols) : std::string(), "], got ", ShapeText(*t));
  }
  return absl::OkStatus();
}

// Before an op writes a variable in place, as TensorFlow's sparse updates do
// (EnsureSparseVariableAccess): put it in copy-on-read mode, first giving it a buffer of
// its own if a tensor read earlier still shares it (that reader keeps the old buffer).
// Once in copy-on-read mode this is one atomic load: no lock is taken.
static Status EnsureSparseAccess(OpKernelContext* ctx, Var* var) {
  if (var->copy_on_read_mode.load()) return absl::OkStatus();
  tensorflow::mutex_lock lock(*var->mu());
  if (var->copy_on_read_mode.load()) return absl::OkStatus();
  if (!var->tensor()->RefCountIsOne()) {
    Tensor copy;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(var->tensor()->dtype(), var->tensor()->shape(), &copy));
    std::memcpy(copy.data(), var->tensor()->data(), var->tensor()->TotalBytes());
    *var->tensor() = copy;
  }
  var->copy_on_read_mode.store(true);
  return absl::OkStatus();
}

// Shared locks on several variables, taken in the address order of their mutexes (as
// TensorFlow's MaybeLockVariableInputMutexesInOrder does), each once.
class SharedLocks {
 public:
  explicit SharedLocks(std::vector<Var*> vars) {
    vars.erase(std::remove(vars.begin(), vars.end(), nullptr), vars.end());
    std::sort(vars.begin(), vars.end(), [](Var* a, Var* b) { return a->mu() < b->mu(); });
    vars.erase(std::unique(vars.begin(), vars.end(), [](Var* a, Var* b) { return a->mu() == b->mu(); }), vars.end());
    for (Var* var : vars) locks_.push_back(std::make_unique<tensorflow::tf_shared_lock>(*var->mu()));
  }

 private:
  std::vector<std::unique_ptr<tensorflow::tf_shared_lock>> locks_;
};

static void ParallelFor(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& work) {
  auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(threads->num_threads, threads->workers, total, cost_per_unit, work);
}

static int64_t PoolThreads(OpKernelContext* ctx) {
  return std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
}

struct Batch {
  const int64_t* rows;
  const int64_t* keys;
  int64_t nnz;
  int64_t batch_size;
};

// rows and keys (inputs rows_input and rows_input + 1): vectors of one length (shapes
// only; the entries are checked by CheckEntries, or by the updates' own scan).
static Status BatchShapes(OpKernelContext* ctx, int rows_input, int64_t batch_size, Batch* batch) {
  TF_RETURN_IF_ERROR(VectorInput(ctx, rows_input, "rows", -1));
  const Tensor& rows = ctx->input(rows_input);
  const Tensor& keys = ctx->input(rows_input + 1);
  if (!TensorShapeUtils::IsVector(keys.shape()) || keys.NumElements() != rows.NumElements()) {
    return errors::InvalidArgument("keys must be a vector as long as rows (", rows.NumElements(), "), got shape ",
                                   ShapeText(keys));
  }
  batch->rows = rows.flat<int64_t>().data();
  batch->keys = keys.flat<int64_t>().data();
  batch->nnz = rows.NumElements();
  batch->batch_size = batch_size;
  return absl::OkStatus();
}

// Whether entry e is bad: its key outside [0, num_keys), its row outside [0, batch_size)
// or below the row before it. Branch-free (unsigned comparisons catch negatives), for
// the scans that check every entry.
static inline bool BadEntry(const Batch& batch, int64_t num_keys, int64_t e) {
  const int64_t k = batch.keys[e], r = batch.rows[e];
  return (static_cast<uint64_t>(k) >= static_cast<uint64_t>(num_keys)) |
         (static_cast<uint64_t>(r) >= static_cast<uint64_t>(batch.batch_size)) | (e > 0 && r < batch.rows[e - 1]);
}

// The InvalidArgument for bad entry e, naming the input.
static Status EntryError(const Batch& batch, int64_t num_keys, int64_t e) {
  const int64_t k = batch.keys[e], r = batch.rows[e];
  if (k < 0 || k >= num_keys) return errors::InvalidArgument("keys[", e, "] = ", k, " is not in [0, ", num_keys, ")");
  if (r < 0 || r >= batch.batch_size) {
    return errors::InvalidArgument("rows[", e, "] = ", r, " is not in [0, ", batch.batch_size, ") (batch_size)");
  }
  return errors::InvalidArgument("rows must be in ascending order (row-major batch); rows[", e, "] = ", r, " < ",
                                 batch.rows[e - 1]);
}

// The first bad entry (serially; only on the error path), as an InvalidArgument.
static Status FirstBadEntry(const Batch& batch, int64_t num_keys) {
  for (int64_t e = 0; e < batch.nnz; ++e) {
    if (BadEntry(batch, num_keys, e)) return EntryError(batch, num_keys, e);
  }
  return absl::OkStatus();
}

// Every entry checked, in parallel over the intra-op pool; the first bad one named.
static Status CheckEntries(OpKernelContext* ctx, const Batch& batch, int64_t num_keys) {
  std::atomic<bool> bad(false);
  ParallelFor(ctx, batch.nnz, 2, [&](int64_t first, int64_t last) {
    bool found = false;
    for (int64_t e = first; e < last; ++e) found |= BadEntry(batch, num_keys, e);
    if (found) bad.store(true);
  });
  return bad.load() ? FirstBadEntry(batch, num_keys) : absl::OkStatus();
}

// BatchShapes and CheckEntries: the batch of a forward or gradient op.
static Status ReadBatch(OpKernelContext* ctx, int rows_input, int64_t num_keys, int64_t batch_size, Batch* batch) {
  TF_RETURN_IF_ERROR(BatchShapes(ctx, rows_input, batch_size, batch));
  return CheckEntries(ctx, *batch, num_keys);
}

// grad_out: a [batch_size, cols] matrix (its rows are the batch's examples).
static Status GradOut(OpKernelContext* ctx, int input, int64_t cols, int64_t* batch_size) {
  const Tensor& t = ctx->input(input);
  if (!TensorShapeUtils::IsMatrix(t.shape()) || t.dim_size(1) != cols) {
    return errors::InvalidArgument("grad_out must be [batch_size, ", cols, "], got shape ", ShapeText(t));
  }
  *batch_size = t.dim_size(0);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------
// Arithmetic.

// A float's maximum raised to at least `value` by compare-and-swap on its bits, so
// concurrent raises never lower it. NaN never raises it (every comparison is false).
static inline void AtomicMax(float* target, float value) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(target);
  uint32_t seen = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float current;
    std::memcpy(&current, &seen, sizeof current);
    if (!(value > current)) return;
    uint32_t wanted;
    std::memcpy(&wanted, &value, sizeof wanted);
    if (__atomic_compare_exchange_n(bits, &seen, wanted, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return;
  }
}

static inline float LoadRelaxed(const float* source) {
  uint32_t bits = __atomic_load_n(reinterpret_cast<const uint32_t*>(source), __ATOMIC_RELAXED);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// A dot product in 16 independent lanes, summed in a fixed order: without -ffast-math a
// single running sum is n dependent scalar adds; lanes let the compiler use SIMD while the
// result stays the same on every run and thread count.
static inline float Dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {0.0f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += a[j + l] * b[j + l];
  }
  float sum = 0.0f;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

// How far ahead the forward pass (entries) and the updates (keys) prefetch rows.
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kGroupsAhead = 8;
constexpr int64_t kSlotsAhead = 8;  // how far ahead the grouping prefetches hash slots

// Brings the cache lines of a row of `bytes` bytes towards the core before it is needed:
// the rows of a 2^20-row table are scattered across hundreds of megabytes. Every line the
// row spans (a 200-byte row starts anywhere in a line, so it spans 4 or 5).
template <bool kWrite>
static inline void PrefetchRow(const float* row, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63};
  const uintptr_t last = reinterpret_cast<uintptr_t>(row) + bytes - 1;
  for (uintptr_t line = first; line <= last; line += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(line), kWrite ? 1 : 0, 1);
  }
}

// ---------------------------------------------------------------------------------
// Grouping a batch's entries by key, for the updates.

// Where a key lives: a multiplicative hash (Fibonacci hashing) whose high bits pick the
// shard and whose low bits probe the shard's table, so both are cheap and independent.
static inline uint64_t KeyHash(int64_t key) { return static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull; }
static inline int64_t ShardOf(uint64_t hash, int64_t shards) {
  return static_cast<int64_t>(((hash >> 32) * static_cast<uint64_t>(shards)) >> 32);
}

// A slot of a shard's hash table: key -> group, taken when its stamp equals the epoch.
// One 16-byte slot per probe: the three fields share a cache line.
struct Slot {
  int64_t key;
  uint32_t stamp;
  int32_t group;
};

// One shard's working memory, kept across steps: the hash table is cleared by moving to a
// new epoch, not by zero-filling it.
struct ShardScratch {
  std::vector<int32_t> entries;  // this shard's entries, in batch order
  std::vector<Slot> slots;
  uint32_t epoch = 0;
  std::vector<int64_t> group_key;
  std::vector<int32_t> group_begin;
  std::vector<int32_t> group_of;
  // The shard's entries in group order, as the updates read them: the offset of the
  // entry's output-gradient row and its normalized value (gathered once, in batch order,
  // so the per-key loop reads them in sequence instead of chasing entry indices).
  std::vector<int64_t> grad_offset;
  std::vector<float> normalized;
  std::vector<float> gw, gsum;  // one key's summed row gradient and summed output gradient

  // A table of at least twice `count` slots, all free; returns its mask.
  uint64_t Prepare(int64_t count) {
    size_t capacity = 16;
    while (capacity < static_cast<size_t>(2 * count)) capacity *= 2;
    if (slots.size() < capacity) {
      slots.assign(capacity, Slot{0, 0, 0});
      epoch = 0;
    }
    if (++epoch == 0) {  // the stamps wrapped: clear them once
      for (Slot& slot : slots) slot.stamp = 0;
      epoch = 1;
    }
    return slots.size() - 1;
  }
};

// Scratch for concurrent runs of one kernel (Hogwild workers run one op node at once):
// each run takes a set of shards' scratch, and gives it back when done.
class ScratchPool {
 public:
  std::unique_ptr<std::vector<ShardScratch>> Take(int64_t shards) {
    std::unique_ptr<std::vector<ShardScratch>> scratch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        scratch = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!scratch) scratch = std::make_unique<std::vector<ShardScratch>>();
    if (static_cast<int64_t>(scratch->size()) < shards) scratch->resize(shards);
    return scratch;
  }
  void Give(std::unique_ptr<std::vector<ShardScratch>> scratch) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(scratch));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<std::vector<ShardScratch>>> free_;
};

// The entries of a batch grouped by key: each distinct key once, with its entries in batch
// order. Keys are split into T shards (T = the intra-op pool's size) by hash; thread t alone
// picks, groups and updates shard t's keys (every thread scans the keys, so no serial pass
// partitions them first), so within one op no two threads write one row and, since each
// key's entries are summed in batch order whatever T is, the result does not depend on T.
//
// ForEachKeyGroup calls per_key(scratch, key, first, count, next_key) once per distinct
// key, on the thread that owns it: the key's entries are scratch.grad_offset and
// scratch.normalized [first, first + count); next_key is the key that thread handles
// kGroupsAhead keys later (-1 near the end), for prefetching.
//
// The batch's entries are checked here, not in a pass of their own: every thread scans
// every entry, so each sees a bad one and writes nothing; the error names the first.
template <typename PerKey>
static Status ForEachKeyGroup(OpKernelContext* ctx, const Batch& batch, int64_t num_keys, const float* n, int64_t cols,
                              ScratchPool* pool, PerKey per_key) {
  const int64_t shards = PoolThreads(ctx);
  std::unique_ptr<std::vector<ShardScratch>> scratch = pool->Take(shards);
  std::atomic<bool> bad(false);
  ParallelFor(ctx, shards, 1 << 30, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      ShardScratch& sc = (*scratch)[s];
      // This shard's entries, picked without a branch (keys hash to shards at random), and
      // every entry checked on the way.
      sc.entries.resize(batch.nnz);
      int32_t* mine = sc.entries.data();
      int64_t count = 0;
      bool found = false;
      for (int64_t e = 0; e < batch.nnz; ++e) {
        found |= BadEntry(batch, num_keys, e);
        mine[count] = static_cast<int32_t>(e);
        count += shards == 1 || ShardOf(KeyHash(batch.keys[e]), shards) == s;
      }
      if (found) {
        bad.store(true);
        continue;
      }
      if (count == 0) continue;
      const uint64_t mask = sc.Prepare(count);
      Slot* slots = sc.slots.data();
      const uint32_t epoch = sc.epoch;
      sc.group_key.clear();
      sc.group_begin.assign(1, 0);
      sc.group_of.resize(count);
      for (int64_t i = 0; i < count; ++i) {
        if (i + kSlotsAhead < count) __builtin_prefetch(&slots[KeyHash(batch.keys[mine[i + kSlotsAhead]]) & mask], 1, 1);
        const int64_t key = batch.keys[mine[i]];
        uint64_t slot = KeyHash(key) & mask;
        while (slots[slot].stamp == epoch && slots[slot].key != key) slot = (slot + 1) & mask;
        if (slots[slot].stamp != epoch) {
          slots[slot] = Slot{key, epoch, static_cast<int32_t>(sc.group_key.size())};
          sc.group_key.push_back(key);
          sc.group_begin.push_back(0);
        }
        sc.group_of[i] = slots[slot].group;
        ++sc.group_begin[sc.group_of[i] + 1];
      }
      const int64_t groups = static_cast<int64_t>(sc.group_key.size());
      for (int64_t g = 0; g < groups; ++g) sc.group_begin[g + 1] += sc.group_begin[g];
      // Entries laid out by group (a counting sort): group_begin[g + 1] is group g's end;
      // filling each group from its end while walking the entries backwards keeps batch
      // order within it and leaves group_begin[g + 1] at group g's start.
      sc.grad_offset.resize(count);
      sc.normalized.resize(count);
      for (int64_t i = count - 1; i >= 0; --i) {
        const int64_t e = mine[i];
        const int32_t at = --sc.group_begin[sc.group_of[i] + 1];
        sc.grad_offset[at] = batch.rows[e] * cols;
        sc.normalized[at] = n[e];
      }
      for (int64_t g = 0; g < groups; ++g) sc.group_begin[g] = sc.group_begin[g + 1];
      sc.group_begin[groups] = static_cast<int32_t>(count);
      sc.gw.resize(cols);
      sc.gsum.resize(cols);
      for (int64_t g = 0; g < groups; ++g) {
        per_key(sc, sc.group_key[g], static_cast<int64_t>(sc.group_begin[g]),
                static_cast<int64_t>(sc.group_begin[g + 1] - sc.group_begin[g]),
                g + kGroupsAhead < groups ? sc.group_key[g + kGroupsAhead] : -1);
      }
    }
  });
  pool->Give(std::move(scratch));
  return bad.load() ? FirstBadEntry(batch, num_keys) : absl::OkStatus();
}

// One key's gradients, summed over its entries in batch order from the rows of the output
// gradient: the row's into gw (cols floats); when with_bias, the summed output gradient
// into gsum, whose dot product with the row (as the forward pass saw it: call this before
// the row is written) is the bias's gradient, returned. One entry (most keys) needs no
// sums: gw then points into g and the caller scales by `scale`.
struct KeyGradient {
  const float* gw;  // the row gradient is scale * gw[j]
  float scale;
  float bias;
};

static inline KeyGradient SumKeyGradient(const float* row, const ShardScratch& sc, int64_t first, int64_t count,
                                         const float* g, int64_t cols, bool with_bias, float* gw, float* gsum) {
  const int64_t* offsets = sc.grad_offset.data() + first;
  const float* ns = sc.normalized.data() + first;
  if (count == 1) {
    const float* go = g + offsets[0];
    return {go, ns[0], with_bias ? Dot(row, go, cols) : 0.0f};
  }
  std::fill(gw, gw + cols, 0.0f);
  if (with_bias) std::fill(gsum, gsum + cols, 0.0f);
  for (int64_t i = 0; i < count; ++i) {
    const float* go = g + offsets[i];
    const float ne = ns[i];
    for (int64_t j = 0; j < cols; ++j) gw[j] += ne * go[j];
    if (with_bias) {
      for (int64_t j = 0; j < cols; ++j) gsum[j] += go[j];
    }
  }
  return {gw, 1.0f, with_bias ? Dot(row, gsum, cols) : 0.0f};
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
    int64_t batch_size = 0;
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 6, "batch_size", &batch_size));
    OP_REQUIRES(ctx, batch_size >= 0, errors::InvalidArgument("batch_size must be >= 0, got ", batch_size));
    RefCountPtr<Var> table, bias, maxima;
    OP_REQUIRES_OK(ctx, Variable(ctx, 0, "table", 2, -1, -1, &table));
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    if (normalize_) {
      OP_REQUIRES_OK(ctx, Variable(ctx, 1, "bias_x", 1, num_keys, -1, &bias));
      OP_REQUIRES_OK(ctx, Variable(ctx, 2, "max_x", 1, num_keys, -1, &maxima));
    }
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 3, num_keys, batch_size, &batch));
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 5, "values", batch.nnz));
    const bool writes_max = normalize_ && training_;
    if (writes_max) OP_REQUIRES_OK(ctx, EnsureSparseAccess(ctx, maxima.get()));
    SharedLocks locks({table.get(), bias.get(), maxima.get()});

    Tensor* out = nullptr;
    Tensor* normalized = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch_size, cols}), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch.nnz}), &normalized));
    const float* v = ctx->input(5).flat<float>().data();
    float* n = normalized->flat<float>().data();
    float* max_x = normalize_ ? maxima->tensor()->flat<float>().data() : nullptr;
    const float* bias_x = normalize_ ? bias->tensor()->flat<float>().data() : nullptr;

    if (writes_max) {  // the whole batch's maxima first, then the division (per-batch semantics)
      ParallelFor(ctx, batch.nnz, 8, [&](int64_t first, int64_t last) {
        for (int64_t e = first; e < last; ++e) {
          if (e + kPrefetchAhead < last) __builtin_prefetch(max_x + batch.keys[e + kPrefetchAhead], 1, 1);
          AtomicMax(max_x + batch.keys[e], std::fabs(v[e]));
        }
      });
    }

    const float* table_data = table->tensor()->flat<float>().data();
    float* out_data = out->flat<float>().data();
    const int64_t per_example = batch_size ? std::max<int64_t>(1, batch.nnz / batch_size) : 1;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    const float epsilon = epsilon_;
    const bool normalize = normalize_;
    ParallelFor(ctx, batch_size, per_example * cols * 4, [&](int64_t first, int64_t last) {
      // rows are ascending: this range's entries start where its first example does
      int64_t e = std::lower_bound(batch.rows, batch.rows + batch.nnz, first) - batch.rows;
      for (int64_t b = first; b < last; ++b) {
        float* o = out_data + b * cols;
        std::fill(o, o + cols, 0.0f);
        for (; e < batch.nnz && batch.rows[e] == b; ++e) {
          if (e + kPrefetchAhead < batch.nnz) {
            const int64_t ahead = batch.keys[e + kPrefetchAhead];
            PrefetchRow<false>(table_data + ahead * cols, row_bytes);
            if (normalize) {
              __builtin_prefetch(max_x + ahead, 0, 1);
              __builtin_prefetch(bias_x + ahead, 0, 1);
            }
          }
          const int64_t k = batch.keys[e];
          const float scale = normalize ? v[e] / std::max(LoadRelaxed(max_x + k), epsilon) + bias_x[k] : v[e];
          n[e] = scale;
          const float* row = table_data + k * cols;
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
    OP_REQUIRES_OK(ctx, Variable(ctx, 0, "table", 2, -1, -1, &table));
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    int64_t batch_size = 0;
    OP_REQUIRES_OK(ctx, GradOut(ctx, 4, cols, &batch_size));
    Batch batch;
    OP_REQUIRES_OK(ctx, ReadBatch(ctx, 1, num_keys, batch_size, &batch));
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 3, "normalized", batch.nnz));
    SharedLocks locks({table.get()});
    Tensor* table_grad = nullptr;
    Tensor* bias_grad = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch.nnz, cols}), &table_grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch.nnz}), &bias_grad));
    const float* n = ctx->input(3).flat<float>().data();
    const float* g = ctx->input(4).flat<float>().data();
    const float* table_data = table->tensor()->flat<float>().data();
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
  // Looks up, checks and readies for writing (copy-on-read) the variable of `input`.
  Status Writable(OpKernelContext* ctx, int input, const char* name, int rank, int64_t rows, int64_t cols,
                  RefCountPtr<Var>* var) {
    TF_RETURN_IF_ERROR(Variable(ctx, input, name, rank, rows, cols, var));
    return EnsureSparseAccess(ctx, var->get());
  }

  bool normalize_;
  ScratchPool scratch_;
};

// ---------------------------------------------------------------------------------
// Fused SGD.

class FusedSgdUpdateOp : public FusedUpdateOp {
 public:
  using FusedUpdateOp::FusedUpdateOp;

  void Compute(OpKernelContext* ctx) override {
    RefCountPtr<Var> table, bias;
    OP_REQUIRES_OK(ctx, Writable(ctx, 0, "table", 2, -1, -1, &table));
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    if (normalize_) OP_REQUIRES_OK(ctx, Writable(ctx, 1, "bias_x", 1, num_keys, -1, &bias));
    int64_t batch_size = 0;
    OP_REQUIRES_OK(ctx, GradOut(ctx, 5, cols, &batch_size));
    Batch batch;
    OP_REQUIRES_OK(ctx, BatchShapes(ctx, 2, batch_size, &batch));  // entries: checked by ForEachKeyGroup
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 4, "normalized", batch.nnz));
    float lr = 0.0f;
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 6, "learning_rate", &lr));
    SharedLocks locks({table.get(), bias.get()});
    const float* n = ctx->input(4).flat<float>().data();
    const float* g = ctx->input(5).flat<float>().data();
    float* w = table->tensor()->flat<float>().data();
    float* b = normalize_ ? bias->tensor()->flat<float>().data() : nullptr;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    OP_REQUIRES_OK(ctx, ForEachKeyGroup(ctx, batch, num_keys, n, cols, &scratch_,
                    [&](ShardScratch& sc, int64_t k, int64_t first, int64_t count, int64_t next_key) {
                      if (next_key >= 0) PrefetchRow<true>(w + next_key * cols, row_bytes);
                      float* row = w + k * cols;
                      const KeyGradient grad = SumKeyGradient(row, sc, first, count, g, cols, b != nullptr,
                                                              sc.gw.data(), sc.gsum.data());
                      const float step = lr * grad.scale;
                      for (int64_t j = 0; j < cols; ++j) row[j] -= step * grad.gw[j];
                      if (b != nullptr) b[k] -= lr * grad.bias;
                    }));
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
    OP_REQUIRES_OK(ctx, Writable(ctx, 0, "table", 2, -1, -1, &table));
    const int64_t num_keys = table->tensor()->dim_size(0), cols = table->tensor()->dim_size(1);
    OP_REQUIRES_OK(ctx, Writable(ctx, 1, "table_m", 2, num_keys, cols, &table_m));
    OP_REQUIRES_OK(ctx, Writable(ctx, 2, "table_v", 2, num_keys, cols, &table_v));
    if (normalize_) {
      OP_REQUIRES_OK(ctx, Writable(ctx, 3, "bias_x", 1, num_keys, -1, &bias));
      OP_REQUIRES_OK(ctx, Writable(ctx, 4, "bias_m", 1, num_keys, -1, &bias_m));
      OP_REQUIRES_OK(ctx, Writable(ctx, 5, "bias_v", 1, num_keys, -1, &bias_v));
    }
    int64_t batch_size = 0;
    OP_REQUIRES_OK(ctx, GradOut(ctx, 9, cols, &batch_size));
    Batch batch;
    OP_REQUIRES_OK(ctx, BatchShapes(ctx, 6, batch_size, &batch));  // entries: checked by ForEachKeyGroup
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 8, "normalized", batch.nnz));
    float lr = 0, beta1 = 0, beta2 = 0, epsilon = 0, beta1_power = 0, beta2_power = 0;
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 10, "learning_rate", &lr));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 11, "beta1", &beta1));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 12, "beta2", &beta2));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 13, "epsilon", &epsilon));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 14, "beta1_power", &beta1_power));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 15, "beta2_power", &beta2_power));
    SharedLocks locks({table.get(), table_m.get(), table_v.get(), bias.get(), bias_m.get(), bias_v.get()});
    const float* n = ctx->input(8).flat<float>().data();
    const float* g = ctx->input(9).flat<float>().data();
    const float lr_t = lr * std::sqrt(1.0f - beta2_power) / (1.0f - beta1_power);
    float* w = table->tensor()->flat<float>().data();
    float* m = table_m->tensor()->flat<float>().data();
    float* v = table_v->tensor()->flat<float>().data();
    float* b = normalize_ ? bias->tensor()->flat<float>().data() : nullptr;
    float* bm = normalize_ ? bias_m->tensor()->flat<float>().data() : nullptr;
    float* bv = normalize_ ? bias_v->tensor()->flat<float>().data() : nullptr;

    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    OP_REQUIRES_OK(ctx, ForEachKeyGroup(ctx, batch, num_keys, n, cols, &scratch_,
                    [&](ShardScratch& sc, int64_t k, int64_t first, int64_t count, int64_t next_key) {
                      if (next_key >= 0) {
                        PrefetchRow<true>(w + next_key * cols, row_bytes);
                        PrefetchRow<true>(m + next_key * cols, row_bytes);
                        PrefetchRow<true>(v + next_key * cols, row_bytes);
                      }
                      float* row = w + k * cols;
                      const KeyGradient grad = SumKeyGradient(row, sc, first, count, g, cols, b != nullptr,
                                                              sc.gw.data(), sc.gsum.data());
                      float* mr = m + k * cols;
                      float* vr = v + k * cols;
                      for (int64_t j = 0; j < cols; ++j) {
                        const float gj = grad.scale * grad.gw[j];
                        mr[j] = beta1 * mr[j] + (1.0f - beta1) * gj;
                        vr[j] = beta2 * vr[j] + (1.0f - beta2) * gj * gj;
                        row[j] -= lr_t * mr[j] / (std::sqrt(vr[j]) + epsilon);
                      }
                      if (b != nullptr) {
                        bm[k] = beta1 * bm[k] + (1.0f - beta1) * grad.bias;
                        bv[k] = beta2 * bv[k] + (1.0f - beta2) * grad.bias * grad.bias;
                        b[k] -= lr_t * bm[k] / (std::sqrt(bv[k]) + epsilon);
                      }
                    }));
  }
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchFusedLazyAdamUpdate").Device(DEVICE_CPU), FusedLazyAdamUpdateOp);

// ---------------------------------------------------------------------------------
// The memory bound of a key stream.

class MemoryBoundOp : public OpKernel {
 public:
  explicit MemoryBoundOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    int64_t num_keys = 0, cols = 0, row_tables = 0, passes = 0;
    bool dense_update = false, normalize = false;
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 5, "num_keys", &num_keys));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 6, "cols", &cols));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 7, "row_tables", &row_tables));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 8, "dense_update", &dense_update));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 9, "normalize", &normalize));
    OP_REQUIRES_OK(ctx, ScalarInput(ctx, 10, "passes", &passes));
    OP_REQUIRES(ctx, num_keys >= 1 && cols >= 1 && row_tables >= 1 && row_tables <= 4 && passes >= 1,
                errors::InvalidArgument("num_keys, cols and passes must be >= 1 and row_tables in [1, 4], got ",
                                        num_keys, ", ", cols, ", ", passes, ", ", row_tables));
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 0, "rows", -1));
    const int64_t nnz = ctx->input(0).NumElements();
    OP_REQUIRES_OK(ctx, VectorInput(ctx, 1, "keys", nnz));
    const Tensor& splits_t = ctx->input(2);
    const Tensor& unique_t = ctx->input(3);
    const Tensor& unique_splits_t = ctx->input(4);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(splits_t.shape()) && splits_t.NumElements() >= 2,
                errors::InvalidArgument("batch_splits must be a vector of at least 2, got shape ", ShapeText(splits_t)));
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(unique_t.shape()),
                errors::InvalidArgument("unique_keys must be a vector, got shape ", ShapeText(unique_t)));
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(unique_splits_t.shape()) &&
                         unique_splits_t.NumElements() == splits_t.NumElements(),
                errors::InvalidArgument("unique_splits must be as long as batch_splits (", splits_t.NumElements(),
                                        "), got shape ", ShapeText(unique_splits_t)));
    const int64_t batches = splits_t.NumElements() - 1;
    const int64_t* splits = splits_t.flat<int64_t>().data();
    const int64_t* unique_splits = unique_splits_t.flat<int64_t>().data();
    const int64_t* rows = ctx->input(0).flat<int64_t>().data();
    const int64_t* keys = ctx->input(1).flat<int64_t>().data();
    const int64_t* unique = unique_t.flat<int64_t>().data();
    const int64_t unique_total = unique_t.NumElements();
    for (int64_t i = 0; i < batches; ++i) {
      OP_REQUIRES(ctx, 0 <= splits[i] && splits[i] <= splits[i + 1] && splits[i + 1] <= nnz,
                  errors::InvalidArgument("batch_splits[", i + 1, "] = ", splits[i + 1], " is out of order or past ",
                                          nnz));
      OP_REQUIRES(ctx, 0 <= unique_splits[i] && unique_splits[i] <= unique_splits[i + 1] &&
                           unique_splits[i + 1] <= unique_total,
                  errors::InvalidArgument("unique_splits[", i + 1, "] = ", unique_splits[i + 1],
                                          " is out of order or past ", unique_total));
    }
    int64_t batch_size = 0;
    for (int64_t e = 0; e < nnz; ++e) {
      OP_REQUIRES(ctx, keys[e] >= 0 && keys[e] < num_keys,
                  errors::InvalidArgument("keys[", e, "] = ", keys[e], " is not in [0, ", num_keys, ")"));
      OP_REQUIRES(ctx, rows[e] >= 0, errors::InvalidArgument("rows[", e, "] = ", rows[e], " is negative"));
      batch_size = std::max(batch_size, rows[e] + 1);
    }
    for (int64_t i = 0; i < batches; ++i) {
      for (int64_t e = splits[i] + 1; e < splits[i + 1]; ++e) {
        OP_REQUIRES(ctx, rows[e] >= rows[e - 1],
                    errors::InvalidArgument("rows must be ascending within each batch; rows[", e, "] = ", rows[e]));
      }
    }
    for (int64_t u = 0; u < unique_total; ++u) {
      OP_REQUIRES(ctx, unique[u] >= 0 && unique[u] < num_keys,
                  errors::InvalidArgument("unique_keys[", u, "] = ", unique[u], " is not in [0, ", num_keys, ")"));
    }

    // The tables, allocated and touched before any pass is timed.
    std::vector<Tensor> tables(row_tables), scalars(normalize ? row_tables + 1 : 0);
    for (auto& t : tables) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({num_keys, cols}), &t));
      t.flat<float>().setConstant(0.01f);
    }
    for (auto& t : scalars) {  // max_x, bias_x and the bias's moments
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({num_keys}), &t));
      t.flat<float>().setConstant(1.0f);
    }
    Tensor out_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({std::max<int64_t>(batch_size, 1), cols}),
                                           &out_t));
    float* out = out_t.flat<float>().data();
    std::vector<float*> table_data, scalar_data;
    for (auto& t : tables) table_data.push_back(t.flat<float>().data());
    for (auto& t : scalars) scalar_data.push_back(t.flat<float>().data());
    const float* w = table_data[0];
    const float* max_x = normalize ? scalar_data[0] : nullptr;
    const float* bias_x = normalize ? scalar_data[1] : nullptr;
    const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(float));
    const float delta = 0.0f * static_cast<float>(passes);  // a runtime zero: the writes cannot be elided

    Tensor* seconds_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({passes}), &seconds_t));
    double* seconds = seconds_t->flat<double>().data();
    for (int64_t p = 0; p < passes; ++p) {
      const auto start = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < batches; ++i) {
        const int64_t lo = splits[i], hi = splits[i + 1];
        const int64_t examples = hi > lo ? rows[hi - 1] + 1 : 0;
        const int64_t per_example = examples ? std::max<int64_t>(1, (hi - lo) / examples) : 1;
        // forward: every entry's row read into its example's output row
        ParallelFor(ctx, examples, per_example * cols * 4, [&](int64_t first, int64_t last) {
          int64_t e = std::lower_bound(rows + lo, rows + hi, first) - rows;
          for (int64_t b = first; b < last; ++b) {
            float* o = out + b * cols;
            std::fill(o, o + cols, 0.0f);
            for (; e < hi && rows[e] == b; ++e) {
              if (e + kPrefetchAhead < hi) {
                const int64_t ahead = keys[e + kPrefetchAhead];
                PrefetchRow<false>(w + ahead * cols, row_bytes);
                if (normalize) {
                  __builtin_prefetch(max_x + ahead, 0, 1);
                  __builtin_prefetch(bias_x + ahead, 0, 1);
                }
              }
              const int64_t k = keys[e];
              const float scale = normalize ? max_x[k] + bias_x[k] : 1.0f;
              const float* row = w + k * cols;
              for (int64_t j = 0; j < cols; ++j) o[j] += scale * row[j];
            }
          }
        });
        // update: each distinct key's row read and written in every table (or every row)
        auto update = [&](int64_t k) {
          for (float* table : table_data) {
            float* row = table + k * cols;
            for (int64_t j = 0; j < cols; ++j) row[j] += delta;
          }
          for (size_t s = 1; s < scalar_data.size(); ++s) scalar_data[s][k] += delta;
        };
        if (dense_update) {
          ParallelFor(ctx, num_keys, cols * 4 * row_tables, [&](int64_t first, int64_t last) {
            for (int64_t k = first; k < last; ++k) update(k);
          });
        } else {
          const int64_t u_lo = unique_splits[i], u_hi = unique_splits[i + 1];
          ParallelFor(ctx, u_hi - u_lo, cols * 8 * row_tables, [&](int64_t first, int64_t last) {
            for (int64_t u = u_lo + first; u < u_lo + last; ++u) {
              if (u + kGroupsAhead < u_lo + last) {
                for (float* table : table_data) PrefetchRow<true>(table + unique[u + kGroupsAhead] * cols, row_bytes);
              }
              update(unique[u]);
            }
          });
        }
      }
      seconds[p] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("SparsebenchMemoryBound").Device(DEVICE_CPU), MemoryBoundOp);

}  // namespace sparsebench
