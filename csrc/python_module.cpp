// `import ree_kernels._C` loads this library, whose static initialisers register the ops, and
// exposes one function, build_info(), so that Python learns what was built from the library
// itself rather than from private torch queries. Plain CPython API (no pybind11).
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>  // TORCH_VERSION_* (torch/headeronly/version.h is missing from torch 2.8)

#include <algorithm>
#include <string>
#include <vector>

#ifdef REE_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace {

#define REE_STRINGIFY_(x) #x
#define REE_STRINGIFY(x) REE_STRINGIFY_(x)
#if defined(__clang__)
#define REE_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define REE_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define REE_COMPILER "msvc " REE_STRINGIFY(_MSC_FULL_VER)
#else
#define REE_COMPILER "unknown"
#endif

// A new tuple of str, or nullptr with the Python error set.
PyObject* tuple_of(const std::vector<std::string>& items) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(items.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* item = PyUnicode_FromString(items[i].c_str());
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
}

// The ree::* ops with a kernel for `key`, without the namespace. Read from the dispatcher, so it
// lists exactly what this library's TORCH_LIBRARY_IMPL blocks registered.
std::vector<std::string> ops_for(c10::DispatchKey key) {
  std::vector<std::string> names;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNamesForDispatchKey(key)) {
    if (op.name.rfind("ree::", 0) == 0 && op.overload_name.empty()) names.push_back(op.name.substr(5));
  }
  std::sort(names.begin(), names.end());
  return names;
}

// The code-generation switches this translation unit was compiled with; setup.py passes the same
// flags to every C++ source, so they describe the CPU kernels too.
std::vector<std::string> cpu_features() {
  std::vector<std::string> f;
#ifdef __OPTIMIZE__
  f.push_back("optimize");
#endif
#ifdef _OPENMP
  f.push_back("openmp");
#endif
#ifdef __AVX2__
  f.push_back("avx2");
#endif
#ifdef __FMA__
  f.push_back("fma");
#endif
#ifdef __AVX512F__
  f.push_back("avx512f");
#endif
#ifdef __ARM_NEON
  f.push_back("neon");
#endif
#ifdef __FAST_MATH__
  f.push_back("fast-math");
#endif
  return f;
}

// dict[key] = value, taking over the reference to value; false (Python error set) on failure.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  PyObject* kernels = PyDict_New();
#ifdef REE_WITH_CUDA
  PyObject* with_cuda = Py_NewRef(Py_True);
  PyObject* cuda_runtime = PyUnicode_FromFormat("%d.%d", CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10);
#else
  PyObject* with_cuda = Py_NewRef(Py_False);
  PyObject* cuda_runtime = Py_NewRef(Py_None);
#endif
  // `info` owns `kernels` once it is inserted, so one Py_DECREF(info) cleans up on any failure.
  const bool ok =
      set_item(info, "with_cuda", with_cuda) && set_item(info, "cuda_runtime", cuda_runtime) &&
      set_item(info, "torch", PyUnicode_FromString(REE_STRINGIFY(TORCH_VERSION_MAJOR) "." REE_STRINGIFY(
                                  TORCH_VERSION_MINOR) "." REE_STRINGIFY(TORCH_VERSION_PATCH))) &&
      set_item(info, "compiler", PyUnicode_FromString(REE_COMPILER)) &&
      set_item(info, "cpu_features", tuple_of(cpu_features())) && kernels != nullptr &&
      set_item(info, "kernels", Py_NewRef(kernels)) &&
      set_item(kernels, "CPU", tuple_of(ops_for(c10::DispatchKey::CPU))) &&
      set_item(kernels, "CUDA", tuple_of(ops_for(c10::DispatchKey::CUDA)));
  Py_XDECREF(kernels);
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: with_cuda (bool), cuda_runtime (str or None), torch (the version built "
     "against), compiler, cpu_features (tuple of code-generation switches), kernels ({'CPU': ops, "
     "'CUDA': ops}: the torch.ops.ree ops with a kernel for each dispatch key)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "REE kernels: registers torch.ops.ree.*", -1, methods};
  return PyModule_Create(&module);
}
