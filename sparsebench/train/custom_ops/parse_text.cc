// SparsebenchParseText: a batch of libsvm or Criteo lines -> the examples' arrays, in one op.
//
// Why: the tf.strings path runs about ten string ops over every token of a batch (each one
// a copy of ~100k strings) and a regex per line; this op reads each line once, checks it
// against the same rules and parses numbers with std::from_chars.
//
// The rules are `train/inputs/datafiles.py`'s, which the Python readers and the tf.strings
// pipeline share (the tests run all three on the same lines):
// - skipped (not an example, not bad): a line that is whitespace only, or (libsvm) whitespace
//   then `#` and anything;
// - libsvm: `[ \t]*NUMBER([ \t]+[+-]?DIGITS{1,18}:NUMBER)*[ \t]*\r?` where NUMBER is
//   `[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?`, every NUMBER at most 31 characters
//   and finite once rounded to float32 (through double, as Python's float() then float32);
//   key = the integer & (2^feature_bits - 1) (two's complement, as Python's `&`); label > 0 is 1;
// - Criteo: `[+-]?DIGITS{1,18}(\t[+-]?DIGITS{0,30}){13}(\t[0-9a-fA-F]{0,16}){26}\r?`;
//   integer column i (non-empty) is key splitmix64(i << 32) & mask with the count as value;
//   categorical column j with hex h is key splitmix64(((13 + j) << 32) + h) & mask, value 1
//   (uint64 arithmetic wraps, as Python's masked sums do);
// - anything else is a bad line.
// Within an example keys are sorted (stable: a repeated key keeps both entries, as the
// tf.strings pipeline does; the Python readers keep the last value).
//
// Outputs: row_lengths int32 [examples], labels float [examples], keys int64 [entries],
// values float [entries], line_kinds int32 [lines] (0 example, 1 skipped, 2 bad) so the
// caller can count and name bad lines.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace sparsebench_parse {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::tstring;

constexpr int kMaxLiteral = 31;
constexpr int kKeyDigits = 18;
constexpr int kCriteoInts = 13;
constexpr int kCriteoCats = 26;
enum Kind : int32_t { kExample = 0, kSkipped = 1, kBad = 2 };

inline bool IsDigit(char c) { return c >= '0' && c <= '9'; }
inline bool IsBlank(char c) { return c == ' ' || c == '\t'; }
inline bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\f' || c == '\r'; }  // RE2's \s
inline int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// NUMBER at p: its end, or nullptr if there is none. Grammar only; the value comes later.
const char* ScanNumber(const char* p, const char* end) {
  const char* start = p;
  if (p < end && (*p == '+' || *p == '-')) ++p;
  const char* digits = p;
  while (p < end && IsDigit(*p)) ++p;
  bool integer_part = p > digits;
  if (p < end && *p == '.') {
    ++p;
    const char* fraction = p;
    while (p < end && IsDigit(*p)) ++p;
    if (!integer_part && p == fraction) return nullptr;  // "." alone
  } else if (!integer_part) {
    return nullptr;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    const char* exponent = p + 1;
    if (exponent < end && (*exponent == '+' || *exponent == '-')) ++exponent;
    const char* exponent_digits = exponent;
    while (exponent < end && IsDigit(*exponent)) ++exponent;
    if (exponent > exponent_digits) p = exponent;  // else the 'e' is not part of the number
  }
  (void)start;
  return p;
}

// The value of a NUMBER span, as Python's float() then float32; false when it is longer than
// kMaxLiteral characters or not finite in float32.
bool NumberValue(const char* p, const char* end, float* out) {
  if (end - p > kMaxLiteral) return false;
  bool negative = false;
  if (*p == '+' || *p == '-') {
    negative = *p == '-';
    ++p;
  }
  double value = 0;
  auto result = std::from_chars(p, end, value, std::chars_format::general);
  if (result.ec == std::errc::result_out_of_range) {
    // Beyond double: Python's float() gives inf (too large) or 0 (too small). Which one:
    // an exponent sign of '-' means too small.
    const char* e = std::find_if(p, end, [](char c) { return c == 'e' || c == 'E'; });
    value = (e < end && e + 1 < end && e[1] == '-') ? 0.0 : HUGE_VAL;
  } else if (result.ec != std::errc() || result.ptr != end) {
    return false;
  }
  float single = static_cast<float>(negative ? -value : value);
  if (!std::isfinite(single)) return false;
  *out = single;
  return true;
}

struct Example {
  float label;
  std::vector<std::pair<int64_t, float>> features;
};

// Whitespace only, or (libsvm) a comment: `\s*(#.*)?`.
bool Skipped(const char* p, const char* end, bool comments) {
  while (p < end && IsSpace(*p)) ++p;
  return p == end || (comments && *p == '#');
}

bool ParseLibsvm(const char* p, const char* end, uint64_t mask, Example* example) {
  if (end > p && end[-1] == '\r') --end;
  while (p < end && IsBlank(*p)) ++p;
  const char* label_end = ScanNumber(p, end);
  if (label_end == nullptr) return false;
  float label;
  if (!NumberValue(p, label_end, &label)) return false;
  example->label = label > 0 ? 1.0f : 0.0f;
  p = label_end;
  while (true) {
    const char* gap = p;
    while (p < end && IsBlank(*p)) ++p;
    if (p == end) return true;
    if (p == gap) return false;  // a pair must follow whitespace
    bool negative = false;
    if (*p == '+' || *p == '-') {
      negative = *p == '-';
      ++p;
    }
    const char* key_start = p;
    uint64_t key = 0;
    while (p < end && IsDigit(*p)) key = key * 10 + static_cast<uint64_t>(*p++ - '0');
    if (p == key_start || p - key_start > kKeyDigits || p == end || *p != ':') return false;
    ++p;
    const char* value_end = ScanNumber(p, end);
    if (value_end == nullptr) return false;
    float value;
    if (!NumberValue(p, value_end, &value)) return false;
    p = value_end;
    uint64_t wrapped = negative ? (~key + 1) : key;  // two's complement, then masked
    example->features.emplace_back(static_cast<int64_t>(wrapped & mask), value);
  }
}

bool ParseCriteo(const char* p, const char* end, uint64_t mask, Example* example) {
  if (end > p && end[-1] == '\r') --end;
  // The label: [+-]?[0-9]{1,18}.
  bool negative = false;
  if (p < end && (*p == '+' || *p == '-')) {
    negative = *p == '-';
    ++p;
  }
  const char* digits = p;
  uint64_t label = 0;
  while (p < end && IsDigit(*p)) label = label * 10 + static_cast<uint64_t>(*p++ - '0');
  if (p == digits || p - digits > kKeyDigits) return false;
  example->label = (!negative && label > 0) ? 1.0f : 0.0f;
  for (int column = 0; column < kCriteoInts + kCriteoCats; ++column) {
    if (p == end || *p != '\t') return false;
    const char* field = ++p;
    while (p < end && *p != '\t') ++p;
    const char* field_end = p;
    if (field == field_end) continue;
    if (column < kCriteoInts) {  // [+-]?[0-9]{0,30}: a sign alone is allowed and means nothing
      const char* q = field;
      bool minus = false;
      if (*q == '+' || *q == '-') {
        minus = *q == '-';
        ++q;
      }
      if (field_end - q > 30 || !std::all_of(q, field_end, IsDigit)) return false;
      if (q == field_end) return false;  // Python's int("+") fails: a bad line (see datafiles)
      double count = 0;
      auto result = std::from_chars(q, field_end, count, std::chars_format::general);
      if (result.ec != std::errc() || result.ptr != field_end) return false;
      uint64_t key = SplitMix64(static_cast<uint64_t>(column) << 32) & mask;
      example->features.emplace_back(static_cast<int64_t>(key), static_cast<float>(minus ? -count : count));
    } else {  // [0-9a-fA-F]{0,16}
      if (field_end - field > 16) return false;
      uint64_t hex = 0;
      for (const char* q = field; q < field_end; ++q) {
        int digit = HexDigit(*q);
        if (digit < 0) return false;
        hex = (hex << 4) | static_cast<uint64_t>(digit);
      }
      uint64_t hashed = (static_cast<uint64_t>(column) << 32) + hex;
      example->features.emplace_back(static_cast<int64_t>(SplitMix64(hashed) & mask), 1.0f);
    }
  }
  return p == end;
}

class ParseTextOp : public OpKernel {
 public:
  explicit ParseTextOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string format;
    OP_REQUIRES_OK(context, context->GetAttr("format", &format));
    OP_REQUIRES(context, format == "libsvm" || format == "criteo",
                tensorflow::errors::InvalidArgument("format must be libsvm or criteo, got ", format));
    criteo_ = format == "criteo";
    int bits;
    OP_REQUIRES_OK(context, context->GetAttr("feature_bits", &bits));
    OP_REQUIRES(context, bits >= 1 && bits <= 62,
                tensorflow::errors::InvalidArgument("feature_bits must be in [1, 62], got ", bits));
    mask_ = (uint64_t{1} << bits) - 1;
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& lines_tensor = context->input(0);
    OP_REQUIRES(context, lines_tensor.dims() == 1,
                tensorflow::errors::InvalidArgument("lines must be a vector, got shape ",
                                                    lines_tensor.shape().DebugString()));
    auto lines = lines_tensor.flat<tstring>();
    const int64_t count = lines.size();
    std::vector<Example> examples(count);
    std::vector<int32_t> kinds(count);
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const char* p = lines(i).data();
        const char* e = p + lines(i).size();
        if (Skipped(p, e, !criteo_)) {
          kinds[i] = kSkipped;
          continue;
        }
        Example& example = examples[i];
        bool ok = criteo_ ? ParseCriteo(p, e, mask_, &example) : ParseLibsvm(p, e, mask_, &example);
        if (!ok) {
          example.features.clear();
          kinds[i] = kBad;
          continue;
        }
        std::stable_sort(example.features.begin(), example.features.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
        kinds[i] = kExample;
      }
    };
    auto* pool = context->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(pool->num_threads, pool->workers, count, /*cost_per_unit=*/20000, work);

    int64_t kept = 0, entries = 0;
    for (int64_t i = 0; i < count; ++i) {
      if (kinds[i] == kExample) {
        ++kept;
        entries += static_cast<int64_t>(examples[i].features.size());
      }
    }
    OP_REQUIRES(context, entries <= INT32_MAX,
                tensorflow::errors::InvalidArgument("a batch of lines with ", entries,
                                                    " entries: at most 2^31 - 1 per call"));
    Tensor *lengths, *labels, *keys, *values, *line_kinds;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({kept}), &lengths));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({kept}), &labels));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({entries}), &keys));
    OP_REQUIRES_OK(context, context->allocate_output(3, TensorShape({entries}), &values));
    OP_REQUIRES_OK(context, context->allocate_output(4, TensorShape({count}), &line_kinds));
    auto lengths_out = lengths->flat<int32_t>();
    auto labels_out = labels->flat<float>();
    auto keys_out = keys->flat<int64_t>();
    auto values_out = values->flat<float>();
    auto kinds_out = line_kinds->flat<int32_t>();
    int64_t row = 0, at = 0;
    for (int64_t i = 0; i < count; ++i) {
      kinds_out(i) = kinds[i];
      if (kinds[i] != kExample) continue;
      lengths_out(row) = static_cast<int32_t>(examples[i].features.size());
      labels_out(row) = examples[i].label;
      for (const auto& feature : examples[i].features) {
        keys_out(at) = feature.first;
        values_out(at) = feature.second;
        ++at;
      }
      ++row;
    }
  }

 private:
  bool criteo_ = false;
  uint64_t mask_ = 0;
};

REGISTER_OP("SparsebenchParseText")
    .Input("lines: string")
    .Output("row_lengths: int32")
    .Output("labels: float")
    .Output("keys: int64")
    .Output("values: float")
    .Output("line_kinds: int32")
    .Attr("format: string")
    .Attr("feature_bits: int")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      tensorflow::shape_inference::ShapeHandle lines;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &lines));
      for (int i = 0; i < 4; ++i) c->set_output(i, c->Vector(c->UnknownDim()));
      c->set_output(4, lines);
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("SparsebenchParseText").Device(DEVICE_CPU), ParseTextOp);

}  // namespace sparsebench_parse
