// The xlkernels operator library and the Python module that carries it.
// Each op's schema is declared next to its CPU kernel (csrc/cpu/<op>.cpp, TORCH_LIBRARY_FRAGMENT);
// CUDA implementations are bound in csrc/cuda/<op>_binding.cpp.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#define XLK_STR_(x) #x
#define XLK_STR(x) XLK_STR_(x)

TORCH_LIBRARY(xlkernels, m) {
  m.def("_with_cuda() -> bool");
}

static bool with_cuda() {
#ifdef XLK_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY_IMPL(xlkernels, CompositeExplicitAutograd, m) {
  m.impl("_with_cuda", &with_cuda);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "xlkernels compiled kernels", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod != nullptr) {
    PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda() ? 1 : 0);
    // The torch whose headers this was compiled against (xlkernels/_ext.py compares it with the running one).
    PyModule_AddStringConstant(mod, "TORCH_VERSION", XLK_STR(TORCH_VERSION_MAJOR) "." XLK_STR(TORCH_VERSION_MINOR) "."
                               XLK_STR(TORCH_VERSION_PATCH));
  }
  return mod;
}
