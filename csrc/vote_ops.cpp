// Torch bindings of the vote-aggregation core (vote_core.cpp):
//   torch.ops.tempo_vote.aggregate(hashes, offsets, truth=None) -> 7 tensors   (CPU here; CUDA
//     in vote_cuda.cu). Without truth, `correct` and `majority_correct` are empty.
//   tempo._vote_ext.hash_answers(list[str | None]) -> int64 tensor   (pybind; strings are CPU)
//   tempo._vote_ext.canonicalize(str | None) -> str | None            (pybind)
// The public API, with the pure-Python fallback, is tempo/vote.py.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "vote_checks.h"
#include "vote_core.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _vote_ext
#endif

namespace tempo_vote {
namespace {

AggregateStats aggregate_cpu(const at::Tensor& hashes, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& truth) {
  check_aggregate_args(hashes, offsets, truth);
  const at::Tensor h = hashes.contiguous();
  const at::Tensor off = offsets.contiguous();
  const int64_t n = h.numel();
  const int64_t groups = off.numel() - 1;
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[groups] == n, "tempo_vote::aggregate: offsets must start at 0 and end at N = ",
              n, ", got ", o[0], " and ", o[groups]);
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(o[g] <= o[g + 1], "tempo_vote::aggregate: offsets must be non-decreasing (offsets[",
                g, "] = ", o[g], " > offsets[", g + 1, "] = ", o[g + 1], ")");
  const AggregateBuffers b(h, groups, truth);
  aggregate(h.data_ptr<int64_t>(), n, o, groups, b.truth_ptr(), b.majority.data_ptr<int64_t>(),
            b.majority_count.data_ptr<int64_t>(), b.agreement.data_ptr<float>(),
            b.distinct.data_ptr<int64_t>(), b.entropy.data_ptr<float>(), b.correct_ptr(),
            b.majority_correct_ptr());
  return b.outputs();
}

// UTF-8 view of a str (surrogates kept via "surrogatepass", like the Python fallback). When a
// temporary bytes object is needed it is stored in `keep`.
std::string_view utf8_of(PyObject* obj, std::vector<py::object>& keep) {
  Py_ssize_t len = 0;
  const char* p = PyUnicode_AsUTF8AndSize(obj, &len);
  if (p != nullptr) return {p, static_cast<size_t>(len)};
  PyErr_Clear();
  PyObject* b = PyUnicode_AsEncodedString(obj, "utf-8", "surrogatepass");
  if (b == nullptr) throw py::error_already_set();
  keep.push_back(py::reinterpret_steal<py::object>(b));
  return {PyBytes_AS_STRING(b), static_cast<size_t>(PyBytes_GET_SIZE(b))};
}

at::Tensor hash_answers_py(py::handle answers) {
  py::object seq = py::reinterpret_steal<py::object>(
      PySequence_Fast(answers.ptr(), "hash_answers expects a sequence of str or None"));
  if (!seq) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject* const* items = PySequence_Fast_ITEMS(seq.ptr());
  at::Tensor out = at::empty({static_cast<int64_t>(n)}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  std::vector<char> deferred(static_cast<size_t>(n), 0);
  // One pass over the objects, each touched once. OpenMP workers only READ immutable str objects
  // (type flags, compact-ASCII data) while this thread holds the GIL, so no Python code runs
  // meanwhile; anything else (non-ASCII, str subclasses, wrong types) is deferred to the serial
  // loop below, which uses the C API.
#pragma omp parallel if (n >= kParallelMinAnswers)
  {
    Canonicalizer canon;
#pragma omp for schedule(dynamic, 512)
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = items[i];
      if (obj == Py_None) {
        o[i] = 0;
      } else if (PyUnicode_CheckExact(obj) && PyUnicode_IS_COMPACT_ASCII(obj)) {
        o[i] = answer_hash(canon(std::string_view(static_cast<const char*>(PyUnicode_DATA(obj)),
                                                  static_cast<size_t>(PyUnicode_GET_LENGTH(obj)))));
      } else {
        deferred[i] = 1;
      }
    }
  }
  Canonicalizer canon;
  std::vector<py::object> keep;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!deferred[i]) continue;
    PyObject* obj = items[i];
    if (!PyUnicode_Check(obj))
      throw py::type_error("hash_answers: answers must be str or None, got " +
                           std::string(Py_TYPE(obj)->tp_name) + " at index " + std::to_string(i));
    keep.clear();
    o[i] = answer_hash(canon(utf8_of(obj, keep)));
  }
  return out;
}

py::object canonicalize_py(py::handle answer) {
  if (answer.is_none()) return py::none();
  if (!PyUnicode_Check(answer.ptr()))
    throw py::type_error("canonicalize: answer must be str or None, got " +
                         std::string(Py_TYPE(answer.ptr())->tp_name));
  std::vector<py::object> keep;
  std::string out;
  if (!canonicalize(utf8_of(answer.ptr(), keep), out)) return py::none();
  PyObject* s = PyUnicode_DecodeUTF8(out.data(), static_cast<Py_ssize_t>(out.size()), "surrogatepass");
  if (s == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(s);
}

}  // namespace

TORCH_LIBRARY(tempo_vote, m) {
  m.set_python_module("tempo.vote");
  m.def(
      "aggregate(Tensor hashes, Tensor offsets, Tensor? truth=None) -> (Tensor majority, "
      "Tensor majority_count, Tensor agreement, Tensor distinct, Tensor entropy, "
      "Tensor correct, Tensor majority_correct)");
}

TORCH_LIBRARY_IMPL(tempo_vote, CPU, m) { m.impl("aggregate", &aggregate_cpu); }

}  // namespace tempo_vote

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "TEMPO vote aggregation (C++/OpenMP; CUDA aggregate when built with CUDA)";
  m.def("hash_answers", &tempo_vote::hash_answers_py, py::arg("answers"),
        "Canonicalise and hash answers (str or None) -> int64 tensor, 0 = no answer");
  m.def("canonicalize", &tempo_vote::canonicalize_py, py::arg("answer"),
        "Canonical form of one answer, None when nothing is left");
#ifdef TEMPO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
