// pybind11 module switch_dit_kernels._C: the permutation kernels behind a plain interface.
//
// Every function takes raw pointers (tensor.data_ptr()), sizes, a dtype tag and the CUDA stream
// handle (torch.cuda.current_stream().cuda_stream) as Python ints, so the module links against
// neither libtorch nor libc10 and one build serves any installed torch. Outputs are written in
// place; nothing is allocated. Tensors must be contiguous; the caller checks shapes and devices.
//
// on_host=True runs the very same row code on the CPU over host pointers (single-threaded): the
// path of CPU tensors and of the tests on machines without a GPU.
#include <pybind11/pybind11.h>

#include <cctype>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "permute.h"

namespace py = pybind11;

namespace {

std::string tag_string(const py::handle& tag) {
  std::string s = py::str(tag);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s.rfind("torch.", 0) == 0) s = s.substr(6);
  return s;
}

// dtype tag: 0/1/2, or a name ("float32", "fp16", "bf16", "torch.bfloat16", a torch.dtype, ...).
sdk::DType parse_dtype(const py::object& tag) {
  if (py::isinstance<py::int_>(tag)) {
    const int v = tag.cast<int>();
    if (v >= 0 && v <= 2) return static_cast<sdk::DType>(v);
  } else {
    const std::string s = tag_string(tag);
    if (s == "float32" || s == "float" || s == "fp32") return sdk::DType::kFloat32;
    if (s == "float16" || s == "half" || s == "fp16") return sdk::DType::kFloat16;
    if (s == "bfloat16" || s == "bf16") return sdk::DType::kBFloat16;
  }
  throw py::value_error("dtype must be 0/'float32', 1/'float16' or 2/'bfloat16', got " +
                        std::string(py::repr(tag)));
}

// index_dtype tag: 0/'int32' or 1/'int64' (a torch.dtype works too).
sdk::IndexType parse_index(const py::object& tag) {
  if (py::isinstance<py::int_>(tag)) {
    const int v = tag.cast<int>();
    if (v == 0 || v == 1) return static_cast<sdk::IndexType>(v);
  } else {
    const std::string s = tag_string(tag);
    if (s == "int32" || s == "int") return sdk::IndexType::kInt32;
    if (s == "int64" || s == "long") return sdk::IndexType::kInt64;
  }
  throw py::value_error("index_dtype must be 0/'int32' or 1/'int64', got " +
                        std::string(py::repr(tag)));
}

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

sdk::RowPermuteArgs make_args(int64_t num_routes, int64_t k, int64_t tokens_per_route,
                              int64_t dim, const py::object& dtype, const py::object& index_dtype,
                              uintptr_t stream, bool on_host) {
  if (num_routes < 0) throw py::value_error("num_routes must be >= 0");
  if (k < 1) throw py::value_error("k must be >= 1");
  if (tokens_per_route < 1) throw py::value_error("tokens_per_route must be >= 1");
  if (dim < 0 || dim > INT32_MAX) throw py::value_error("dim must be in [0, 2^31)");
  // Row offsets are int64: R*k*N rows of D elements must stay below 2^62 elements.
  const double elems = static_cast<double>(num_routes) * k * tokens_per_route * (dim ? dim : 1);
  if (elems > 4.0e18) throw py::value_error("sizes overflow int64 row offsets");
  sdk::RowPermuteArgs a;
  a.num_routes = num_routes;
  a.k = k;
  a.tokens_per_route = tokens_per_route;
  a.dim = dim;
  a.dtype = parse_dtype(dtype);
  a.index_type = parse_index(index_dtype);
  a.stream = ptr<void>(stream);
  a.on_host = on_host;
  return a;
}

void require(bool cond, const char* what) {
  if (!cond) throw py::value_error(std::string(what) + " is a null pointer");
}

void run(const char* (*fn)(const sdk::RowPermuteArgs&), const sdk::RowPermuteArgs& a) {
  if (a.num_routes == 0 || a.dim == 0) return;
  require(a.dst != nullptr, "the output");
  require(a.src != nullptr, "the input");
  require(a.pair_to_sorted != nullptr, "pair_to_sorted");
  const char* err;
  {
    py::gil_scoped_release release;
    err = fn(a);
  }
  if (err != nullptr) throw std::runtime_error(std::string("switch_dit_kernels._C: ") + err);
}

#define SIZE_ARGS                                                                          \
  py::arg("num_routes"), py::arg("k"), py::arg("tokens_per_route"), py::arg("dim"),       \
      py::arg("dtype"), py::arg("index_dtype") = 0, py::arg("stream") = 0,                 \
      py::arg("on_host") = false

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "switch_dit_kernels._C: expert permutation kernels (gather rows into expert-sorted order, "
      "weighted combine back, and their backwards) over raw pointers and a CUDA stream handle.";
  m.attr("__version__") = "0.1.0";
#ifdef SDK_CUDA_ARCHS
  m.attr("cuda_archs") = SDK_CUDA_ARCHS;
#else
  m.attr("cuda_archs") = "";
#endif
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.attr("INDEX_INT32") = 0;
  m.attr("INDEX_INT64") = 1;

  m.def(
      "permute",
      [](uintptr_t out, uintptr_t x, uintptr_t pair_to_sorted, int64_t num_routes, int64_t k,
         int64_t tokens_per_route, int64_t dim, py::object dtype, py::object index_dtype,
         uintptr_t stream, bool on_host) {
        auto a = make_args(num_routes, k, tokens_per_route, dim, dtype, index_dtype, stream,
                           on_host);
        a.dst = ptr<void>(out);
        a.src = ptr<const void>(x);
        a.pair_to_sorted = ptr<const void>(pair_to_sorted);
        run(sdk::scatter_rows, a);
      },
      "out[s*N + n] = x[(sorted_pairs[s] // k)*N + n]: out [R*k*N, D], x [R*N, D], "
      "pair_to_sorted [R*k] (the inverse of sorted_pairs).",
      py::arg("out"), py::arg("x"), py::arg("pair_to_sorted"), SIZE_ARGS);

  m.def(
      "unpermute",
      [](uintptr_t y, uintptr_t h, uintptr_t pair_to_sorted, uintptr_t weights,
         int64_t num_routes, int64_t k, int64_t tokens_per_route, int64_t dim, py::object dtype,
         py::object index_dtype, uintptr_t stream, bool on_host) {
        auto a = make_args(num_routes, k, tokens_per_route, dim, dtype, index_dtype, stream,
                           on_host);
        a.dst = ptr<void>(y);
        a.src = ptr<const void>(h);
        a.pair_to_sorted = ptr<const void>(pair_to_sorted);
        a.weights = ptr<const float>(weights);
        run(sdk::gather_rows, a);
      },
      "y[r*N + n] = sum_j w[r*k + j] * h[pair_to_sorted[r*k + j]*N + n] (float32 accumulation, "
      "j order): y [R*N, D], h [R*k*N, D], weights [R*k] float32 or 0 for unit weights.",
      py::arg("y"), py::arg("h"), py::arg("pair_to_sorted"), py::arg("weights"), SIZE_ARGS);

  m.def(
      "permute_backward",
      [](uintptr_t dx, uintptr_t dout, uintptr_t pair_to_sorted, int64_t num_routes, int64_t k,
         int64_t tokens_per_route, int64_t dim, py::object dtype, py::object index_dtype,
         uintptr_t stream, bool on_host) {
        auto a = make_args(num_routes, k, tokens_per_route, dim, dtype, index_dtype, stream,
                           on_host);
        a.dst = ptr<void>(dx);
        a.src = ptr<const void>(dout);
        a.pair_to_sorted = ptr<const void>(pair_to_sorted);
        run(sdk::gather_rows, a);
      },
      "dx[r*N + n] = sum_j dout[pair_to_sorted[r*k + j]*N + n]: unpermute with unit weights.",
      py::arg("dx"), py::arg("dout"), py::arg("pair_to_sorted"), SIZE_ARGS);

  m.def(
      "unpermute_backward",
      [](uintptr_t dh, uintptr_t dweights_partial, uintptr_t dy, uintptr_t h,
         uintptr_t pair_to_sorted, uintptr_t weights, int64_t num_routes, int64_t k,
         int64_t tokens_per_route, int64_t dim, py::object dtype, py::object index_dtype,
         uintptr_t stream, bool on_host) {
        auto a = make_args(num_routes, k, tokens_per_route, dim, dtype, index_dtype, stream,
                           on_host);
        a.dst = ptr<void>(dh);
        a.src = ptr<const void>(dy);
        a.pair_to_sorted = ptr<const void>(pair_to_sorted);
        a.weights = ptr<const float>(weights);
        if (dweights_partial != 0) {
          require(h != 0 || num_routes == 0 || dim == 0, "h (needed for dweights)");
          a.other = ptr<const void>(h);
          a.dots = ptr<float>(dweights_partial);
        }
        run(sdk::scatter_rows, a);
      },
      "dh[pair_to_sorted[r*k + j]*N + n] = w[r*k + j] * dy[r*N + n]; when dweights_partial is "
      "not 0 also dweights_partial[(r*k + j)*N + n] = <dy[r*N + n], h[pair_to_sorted[r*k + j]*N "
      "+ n]> in float32 ([R*k*N] float32; dweights[r, j] is its sum over n).",
      py::arg("dh"), py::arg("dweights_partial"), py::arg("dy"), py::arg("h"),
      py::arg("pair_to_sorted"), py::arg("weights"), SIZE_ARGS);

  m.def(
      "vectorized",
      [](int64_t dim, py::object dtype, py::args pointers) {
        sdk::RowPermuteArgs a;
        a.dim = dim;
        a.dtype = parse_dtype(dtype);
        uintptr_t p[3] = {0, 0, 0};
        if (pointers.size() > 3) throw py::value_error("at most 3 row pointers");
        for (size_t i = 0; i < pointers.size(); ++i) p[i] = pointers[i].cast<uintptr_t>();
        a.dst = ptr<void>(p[0]);
        a.src = ptr<const void>(p[1]);
        a.other = ptr<const void>(p[2]);
        return sdk::vectorized(a);
      },
      "True when rows of dim elements at these pointers move as 16-byte vectors (the row width "
      "in bytes a multiple of 16 and every pointer 16-byte aligned).",
      py::arg("dim"), py::arg("dtype"));
}
