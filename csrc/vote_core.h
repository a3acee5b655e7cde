// Torch-free core of the TEMPO vote-aggregation extension: answer canonicalisation, 64-bit
// answer hashing and per-group vote aggregation on raw pointers. The rule table and the exact
// semantics are documented at the top of vote_core.cpp; tempo/vote.py mirrors them in Python.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace tempo_vote {

// Below these sizes one thread is faster than waking an OpenMP team (microseconds on an idle
// machine, milliseconds on an oversubscribed one). Thread count: OpenMP's (torch.set_num_threads).
constexpr int64_t kParallelMinAnswers = int64_t{1} << 15;
constexpr int64_t kParallelMinSamples = int64_t{1} << 18;

// Canonicalises extracted final answers (rule table in vote_core.cpp) with reusable scratch
// buffers: one per thread. The returned view is valid until the next call; empty = no answer.
class Canonicalizer {
 public:
  Canonicalizer();
  ~Canonicalizer();
  Canonicalizer(const Canonicalizer&) = delete;
  Canonicalizer& operator=(const Canonicalizer&) = delete;
  std::string_view operator()(std::string_view in);
  struct Scratch;

 private:
  std::unique_ptr<Scratch> sc_;
};

// Canonical form of one answer into `out`; false, with `out` empty, when nothing is left.
bool canonicalize(std::string_view in, std::string& out);

// FNV-1a 64 of `canonical` as int64; 0 for the empty string ("no answer"), and a non-empty
// string whose FNV-1a is 0 hashes to kZeroRemap instead, so 0 always means "no answer".
constexpr uint64_t kZeroRemap = 0x9E3779B97F4A7C15ULL;
int64_t answer_hash(std::string_view canonical);

// Canonicalises and hashes n raw answers (OpenMP over answers). data[i] == nullptr is
// "no answer" (hash 0); lens[i] is the byte length of data[i] (UTF-8).
void hash_answers(const char* const* data, const int64_t* lens, int64_t n, int64_t* out);

// Per-group vote aggregation over int64 answer hashes (0 = no answer). Groups are
// [offsets[g], offsets[g+1]) for g < groups; offsets must start at 0, be non-decreasing and
// end at n (checked by the caller). truth may be null; then correct / majority_correct are
// not written. Output sizes: majority, majority_count, distinct, entropy, correct,
// majority_correct: [groups]; agreement: [n].
void aggregate(const int64_t* hashes, int64_t n, const int64_t* offsets, int64_t groups,
               const int64_t* truth, int64_t* majority, int64_t* majority_count,
               float* agreement, int64_t* distinct, float* entropy, int64_t* correct,
               bool* majority_correct);

}  // namespace tempo_vote
