// TEMPO vote-aggregation core (torch-free): canonicalisation of extracted final answers,
// 64-bit answer hashes, per-group majority vote statistics. OpenMP over answers / groups.
// tempo/vote.py holds a pure-Python mirror that must give IDENTICAL results; change both.
//
// ---------------------------------------------------------------------------------------------
// Canonicalisation rules. One pass applies R1..R8 in order; passes repeat until the string no
// longer changes, at most kMaxPasses (8) passes. An empty result is "no answer". Strings are
// UTF-8 bytes; rules match ASCII only (and the degree sign °, C2 B0), other bytes pass through.
// Tokens (R3, R4, R5): `\` + ASCII letters (control word), `\` + one other byte (control
// symbol), or one byte. Whenever a removal would glue a control word to a following letter, one
// space separates them ("\alpha\!b" -> "\alpha b"); this is the only space ever kept.
//
//  rule  what                                                 example          -> result
//  R1    trim ASCII whitespace (space \t \n \v \f \r)          " 42\n"          -> "42"
//  R2    strip surrounding `$` pairs, repeatedly, trimming     "$$ x^2 $$"      -> "x^2"
//  R3a   drop \left and \right (with the `.` of \left. \right.) "\left(1,2\right)" -> "(1,2)"
//  R3b   drop spacing \! \, \; \: \<whitespace> \quad \qquad,  "1\,000"         -> "1000"
//        and an escaped dollar \$
//  R3c   \dfrac and \tfrac -> \frac                            "\dfrac{1}{2}"   -> "\frac{1}{2}"
//  R3d   \text{X} \mathrm{X} \textbf{X} \mbox{X} -> X          "\text{cm}"      -> "cm"
//        (brace-matched;
//        a command without a matching `{...}` is kept)
//  R4    drop whitespace runs (space kept only as above)       "\frac 1 2"      -> "\frac12"
//  R5    drop degree marks ^\circ, ^{\circ}, \degree and °     "30^{\circ}"     -> "30"
//  R6    drop trailing `.` (one preceded by `\` is kept)       "5."             -> "5"
//  R7    drop a leading single-letter assignment `L=` when     "x=5"            -> "5"
//        something follows it and no other `=` does (an equation stays)
//  R8    normalise a plain decimal [+-]?D*(.D*)? (>= 1 digit): "007"            -> "7"
//        drop `+`, leading zeros of the integer part, trailing "12.00"          -> "12"
//        zeros of the fraction, a `.` with no fraction left;   ".50"            -> "0.5"
//        "-0" -> "0"; thousands separators in groups of 3 dropped "1,000"   -> "1000"
// Not handled (left distinct): \boxed, units other than via \text,
// reordering of tuples / sets; the symbolic level (0.5 vs \frac12) is tempo.vote.merge_equivalent.
//
// Hash: FNV-1a 64 over the canonical bytes, as int64 (two's complement). The empty string
// (no answer) is 0; a non-empty string whose FNV-1a is 0 maps to kZeroRemap.
//
// Aggregation, per group [offsets[g], offsets[g+1]) over hashes (0 = no answer):
//   parsed m = #nonzero; counts per distinct nonzero hash; majority = largest count, ties to the
//   answer whose FIRST occurrence is earliest; no parsed answer -> majority 0, count 0;
//   agreement[i] = 1 if hashes[i] != 0 and == majority else 0; distinct = #distinct nonzero;
//   entropy = sum over distinct answers in first-occurrence order of (c/m) * log(m/c), in double
//   (each product rounded before the add), cast to float; 0 when m == 0;
//   with truth: correct = #(hashes[i] != 0 and == truth[g]); majority_correct = majority != 0
//   and majority == truth[g].
// ---------------------------------------------------------------------------------------------
#include "vote_core.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace tempo_vote {
namespace {

constexpr int kMaxPasses = 8;

inline bool is_space(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
inline bool is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

// End (exclusive) of the token starting at i.
inline size_t token_end(std::string_view s, size_t i) {
  if (s[i] != '\\' || i + 1 >= s.size()) return i + 1;
  if (!is_alpha(static_cast<unsigned char>(s[i + 1]))) return i + 2;
  size_t j = i + 2;
  while (j < s.size() && is_alpha(static_cast<unsigned char>(s[j]))) ++j;
  return j;
}

enum class Cmd { kOther, kLeftRight, kSpacing, kFrac, kUnwrap, kCirc };

inline bool eq(std::string_view tok, const char (&lit)[6]) { return std::memcmp(tok.data(), lit, 5) == 0; }
inline bool eq(std::string_view tok, const char (&lit)[7]) { return std::memcmp(tok.data(), lit, 6) == 0; }
inline bool eq(std::string_view tok, const char (&lit)[8]) { return std::memcmp(tok.data(), lit, 7) == 0; }

// Kind of a token that starts with `\` and has at least two bytes.
inline Cmd classify(std::string_view tok) {
  switch (tok.size()) {
    case 2: {
      const unsigned char c = static_cast<unsigned char>(tok[1]);
      return (c == '!' || c == ',' || c == ';' || c == ':' || c == '$' || is_space(c)) ? Cmd::kSpacing
                                                                                         : Cmd::kOther;
    }
    case 5:
      if (eq(tok, "\\left")) return Cmd::kLeftRight;
      if (eq(tok, "\\quad")) return Cmd::kSpacing;
      if (eq(tok, "\\text") || eq(tok, "\\mbox")) return Cmd::kUnwrap;
      if (eq(tok, "\\circ")) return Cmd::kCirc;
      return Cmd::kOther;
    case 6:
      if (eq(tok, "\\right")) return Cmd::kLeftRight;
      if (eq(tok, "\\dfrac") || eq(tok, "\\tfrac")) return Cmd::kFrac;
      if (eq(tok, "\\qquad")) return Cmd::kSpacing;
      return Cmd::kOther;
    case 7:
      if (eq(tok, "\\degree")) return Cmd::kCirc;
      return (eq(tok, "\\mathrm") || eq(tok, "\\textbf")) ? Cmd::kUnwrap : Cmd::kOther;
    default:
      return Cmd::kOther;
  }
}

// Writes tokens into a buffer, separating a control word from a following letter by one space.
// Such a space only follows a removal of at least one byte, so the output never outgrows the
// input; buffers are sized 2n + 8 all the same.
struct Emitter {
  char* p;
  bool ends_cw = false;
  inline void token(const char* t, size_t len) {
    if (ends_cw && is_alpha(static_cast<unsigned char>(t[0]))) *p++ = ' ';
    if (len == 1) {
      *p++ = t[0];
    } else {
      std::memcpy(p, t, len);
      p += len;
    }
    ends_cw = len >= 2 && t[0] == '\\' && is_alpha(static_cast<unsigned char>(t[1]));
  }
};

// Grow-only scratch buffers; results are views into them.
inline char* begin_buffer(std::string& buf, size_t n) {
  if (buf.size() < 2 * n + 8) buf.resize(2 * n + 8);
  return &buf[0];
}
inline std::string_view end_buffer(const std::string& buf, const char* p) {
  return std::string_view(buf.data(), static_cast<size_t>(p - buf.data()));
}

inline std::string_view trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && is_space(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && is_space(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

}  // namespace

struct Canonicalizer::Scratch {
  std::string x, y, a, b, c;
  std::vector<size_t> open;
  std::vector<char> matched, drop;
  bool saw_circ = false;  // R3 emitted a \circ or \degree token (R5 has work)
};

namespace {
using Scratch = Canonicalizer::Scratch;

// Marks each bare `{` token of s that has a matching `}` (escaped \{ \} are control symbols).
void match_braces(std::string_view s, Scratch& sc) {
  sc.matched.assign(s.size(), 0);
  sc.open.clear();
  for (size_t i = 0; i < s.size(); i = token_end(s, i)) {
    if (s[i] == '{') {
      sc.open.push_back(i);
    } else if (s[i] == '}' && !sc.open.empty()) {
      sc.matched[sc.open.back()] = 1;
      sc.open.pop_back();
    }
  }
}

// R3: \left \right, spacing commands, \dfrac \tfrac, \text{} \mathrm{} \textbf{}.
std::string_view rewrite_commands(std::string_view s, Scratch& sc) {
  const size_t n = s.size();
  Emitter em{begin_buffer(sc.a, n)};
  bool braces_matched = false;
  sc.saw_circ = false;
  sc.drop.clear();  // one entry per open `{`: 1 when its closing `}` is dropped (R3d)
  for (size_t i = 0; i < n;) {
    const size_t j = token_end(s, i);
    const std::string_view tok = s.substr(i, j - i);
    if (tok.size() >= 2 && tok[0] == '\\') {
      const Cmd cmd = classify(tok);
      if (cmd == Cmd::kLeftRight) {
        i = (j < n && s[j] == '.') ? j + 1 : j;
        continue;
      }
      if (cmd == Cmd::kSpacing) {
        i = j;
        continue;
      }
      if (cmd == Cmd::kFrac) {
        em.token("\\frac", 5);
        i = j;
        continue;
      }
      if (cmd == Cmd::kUnwrap && j < n && s[j] == '{') {
        if (!braces_matched) {
          match_braces(s, sc);
          braces_matched = true;
        }
        if (sc.matched[j]) {
          sc.drop.push_back(1);
          i = j + 1;
          continue;
        }
      }
      if (cmd == Cmd::kCirc) sc.saw_circ = true;
    } else if (tok[0] == '{') {
      sc.drop.push_back(0);
    } else if (tok[0] == '}' && !sc.drop.empty()) {
      const char d = sc.drop.back();
      sc.drop.pop_back();
      if (d) {
        i = j;
        continue;
      }
    }
    em.token(tok.data(), tok.size());
    i = j;
  }
  return end_buffer(sc.a, em.p);
}

// R4: drop whitespace tokens.
std::string_view squeeze_whitespace(std::string_view s, Scratch& sc) {
  Emitter em{begin_buffer(sc.b, s.size())};
  for (size_t i = 0; i < s.size();) {
    const size_t j = token_end(s, i);
    if (!is_space(static_cast<unsigned char>(s[i]))) em.token(s.data() + i, j - i);
    i = j;
  }
  return end_buffer(sc.b, em.p);
}

inline bool degree_sign_at(std::string_view s, size_t i) {
  return i + 1 < s.size() && static_cast<unsigned char>(s[i]) == 0xC2 && static_cast<unsigned char>(s[i + 1]) == 0xB0;
}

// R5: drop ^\circ, ^{\circ}, \degree and °.
std::string_view strip_degrees(std::string_view s, Scratch& sc) {
  const size_t n = s.size();
  Emitter em{begin_buffer(sc.c, n)};
  for (size_t i = 0; i < n;) {
    const size_t j = token_end(s, i);
    if (degree_sign_at(s, i)) {
      i += 2;
      continue;
    }
    if (j - i == 7 && eq(s.substr(i), "\\degree")) {
      i = j;
      continue;
    }
    if (s[i] == '^' && j < n) {
      const size_t k = token_end(s, j);
      if (k - j == 5 && eq(s.substr(j), "\\circ")) {
        i = k;
        continue;
      }
      if (s[j] == '{' && k < n) {
        const size_t k2 = token_end(s, k);
        if (k2 - k == 5 && eq(s.substr(k), "\\circ") && k2 < n && s[k2] == '}') {
          i = k2 + 1;
          continue;
        }
      }
    }
    em.token(s.data() + i, j - i);
    i = j;
  }
  return end_buffer(sc.c, em.p);
}

// [+-]? D{1,3} (,DDD)+ (.D*)?: a number with thousands separators.
bool has_thousands(std::string_view s) {
  size_t i = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
  const size_t b = i;
  while (i < s.size() && is_digit(static_cast<unsigned char>(s[i]))) ++i;
  if (i == b || i - b > 3) return false;
  size_t groups = 0;
  while (i + 3 < s.size() && s[i] == ',' && is_digit(static_cast<unsigned char>(s[i + 1])) &&
         is_digit(static_cast<unsigned char>(s[i + 2])) && is_digit(static_cast<unsigned char>(s[i + 3])) &&
         (i + 4 == s.size() || !is_digit(static_cast<unsigned char>(s[i + 4])))) {
    i += 4;
    ++groups;
  }
  if (groups == 0) return false;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && is_digit(static_cast<unsigned char>(s[i]))) ++i;
  }
  return i == s.size();
}

// R8: writes s to p, a plain decimal number normalised; returns the length written (at most
// s.size() + 1: ".5" -> "0.5").
size_t write_normalized(std::string_view s, char* p) {
  const size_t n = s.size();
  size_t i = 0;
  bool neg = false;
  if (i < n && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  const size_t int_b = i;
  while (i < n && is_digit(static_cast<unsigned char>(s[i]))) ++i;
  const size_t int_e = i;
  size_t frac_b = i, frac_e = i;
  if (i < n && s[i] == '.') {
    frac_b = ++i;
    while (i < n && is_digit(static_cast<unsigned char>(s[i]))) ++i;
    frac_e = i;
  }
  if (i != n || (int_e == int_b && frac_e == frac_b)) {  // not a number / no digit
    if (n) std::memcpy(p, s.data(), n);
    return n;
  }
  size_t ib = int_b;
  while (ib < int_e && s[ib] == '0') ++ib;
  size_t fe = frac_e;
  while (fe > frac_b && s[fe - 1] == '0') --fe;
  char* q = p;
  if (neg && !(ib == int_e && fe == frac_b)) *q++ = '-';  // "-0" -> "0"
  if (ib == int_e) {
    *q++ = '0';
  } else {
    std::memcpy(q, s.data() + ib, int_e - ib);
    q += int_e - ib;
  }
  if (fe > frac_b) {
    *q++ = '.';
    std::memcpy(q, s.data() + frac_b, fe - frac_b);
    q += fe - frac_b;
  }
  return static_cast<size_t>(q - p);
}

// One pass of R1..R8 over `in`; the result is a view into `out`.
std::string_view one_pass(std::string_view in, std::string& out, Scratch& sc) {
  std::string_view s = trim(in);                                               // R1
  while (s.size() >= 2 && s.front() == '$' && s.back() == '$')                 // R2
    s = trim(s.substr(1, s.size() - 2));
  // R3 and R5 need a backslash, R4 whitespace; most answers have neither.
  bool has_backslash = false, has_space = false, has_degree_sign = false;
  for (size_t i = 0; i < s.size(); ++i) {
    has_backslash |= s[i] == '\\';
    has_space |= is_space(static_cast<unsigned char>(s[i]));
    has_degree_sign |= degree_sign_at(s, i);
  }
  if (has_backslash) s = rewrite_commands(s, sc);                              // R3
  if (has_space) s = squeeze_whitespace(s, sc);                                // R4
  if ((has_backslash && sc.saw_circ) || has_degree_sign) s = strip_degrees(s, sc);  // R5
  while (!s.empty() && s.back() == '.' && !(s.size() >= 2 && s[s.size() - 2] == '\\'))  // R6
    s.remove_suffix(1);
  if (s.size() >= 3 && is_alpha(static_cast<unsigned char>(s[0])) && s[1] == '=' &&  // R7
      s.find('=', 2) == std::string_view::npos)
    s.remove_prefix(2);
  char* p = begin_buffer(out, s.size());                                       // R8
  if (has_thousands(s)) {
    std::string digits;
    for (const char c : s)
      if (c != ',') digits.push_back(c);
    return std::string_view(p, write_normalized(digits, p));
  }
  return std::string_view(p, write_normalized(s, p));
}

inline uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ULL;
  }
  return h;
}

}  // namespace

Canonicalizer::Canonicalizer() : sc_(new Scratch) {}
Canonicalizer::~Canonicalizer() = default;

std::string_view Canonicalizer::operator()(std::string_view in) {
  std::string* cur = &sc_->x;
  std::string* next = &sc_->y;
  std::string_view v = one_pass(in, *cur, *sc_);
  if (v != in) {
    for (int pass = 1; pass < kMaxPasses; ++pass) {
      const std::string_view w = one_pass(v, *next, *sc_);
      const bool same = w == v;
      std::swap(cur, next);
      v = w;
      if (same) break;
    }
  }
  return v;
}

bool canonicalize(std::string_view in, std::string& out) {
  thread_local Canonicalizer canon;
  out.assign(canon(in));
  return !out.empty();
}

int64_t answer_hash(std::string_view canonical) {
  if (canonical.empty()) return 0;
  uint64_t h = fnv1a64(canonical);
  if (h == 0) h = kZeroRemap;
  return static_cast<int64_t>(h);
}

void hash_answers(const char* const* data, const int64_t* lens, int64_t n, int64_t* out) {
#pragma omp parallel if (n >= kParallelMinAnswers)
  {
    Canonicalizer canon;
#pragma omp for schedule(dynamic, 256)
    for (int64_t i = 0; i < n; ++i)
      out[i] = data[i] == nullptr
                   ? 0
                   : answer_hash(canon(std::string_view(data[i], static_cast<size_t>(lens[i]))));
  }
}

void aggregate(const int64_t* hashes, int64_t n, const int64_t* offsets, int64_t groups,
               const int64_t* truth, int64_t* majority, int64_t* majority_count,
               float* agreement, int64_t* distinct, float* entropy, int64_t* correct,
               bool* majority_correct) {
#pragma omp parallel if (n >= kParallelMinSamples)
  {
    // Classes (distinct non-zero hashes) in first-occurrence order, found through an
    // open-addressing table hash -> class (key 0 = empty slot: 0 never enters it). Measured
    // faster than a linear scan of the classes even for groups of 64 with a few answers.
    std::vector<int64_t> cls_hash, cls_count;
    std::vector<int64_t> keys, slot;
#pragma omp for schedule(dynamic, 64)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = offsets[g], e = offsets[g + 1];
      int bits = 4;
      while ((int64_t{1} << bits) < 2 * (e - b)) ++bits;
      const uint64_t mask = (uint64_t{1} << bits) - 1;
      keys.assign(size_t{1} << bits, 0);
      slot.resize(size_t{1} << bits);
      cls_hash.clear();
      cls_count.clear();
      const int64_t t = truth ? truth[g] : 0;
      int64_t parsed = 0, ncorrect = 0;
      for (int64_t i = b; i < e; ++i) {
        const int64_t h = hashes[i];
        if (h == 0) continue;
        ++parsed;
        if (h == t) ++ncorrect;
        uint64_t pos = (static_cast<uint64_t>(h) * 0x9E3779B97F4A7C15ULL) >> (64 - bits);
        while (true) {
          if (keys[pos] == h) {
            ++cls_count[slot[pos]];
            break;
          }
          if (keys[pos] == 0) {
            keys[pos] = h;
            slot[pos] = static_cast<int64_t>(cls_hash.size());
            cls_hash.push_back(h);
            cls_count.push_back(1);
            break;
          }
          pos = (pos + 1) & mask;
        }
      }
      int64_t best = 0, best_count = 0;
      double ent = 0.0;
      const double m = static_cast<double>(parsed);
      for (size_t k = 0; k < cls_hash.size(); ++k) {
        const int64_t c = cls_count[k];
        if (c > best_count) {  // strict: ties keep the earlier first occurrence
          best_count = c;
          best = cls_hash[k];
        }
        const double cd = static_cast<double>(c);
        // volatile: keep the product rounded on its own (no fused multiply-add), as in Python.
        volatile double term = (cd / m) * std::log(m / cd);
        ent += term;
      }
      majority[g] = best;
      majority_count[g] = best_count;
      distinct[g] = static_cast<int64_t>(cls_hash.size());
      entropy[g] = static_cast<float>(ent);
      if (truth) {
        correct[g] = ncorrect;
        majority_correct[g] = best != 0 && best == t;
      }
      for (int64_t i = b; i < e; ++i)
        agreement[i] = (best != 0 && hashes[i] == best) ? 1.0f : 0.0f;
    }
  }
}

}  // namespace tempo_vote
