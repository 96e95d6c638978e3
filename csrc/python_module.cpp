// `import ree_kernels._C` loads this library, whose static initialisers register the ops.
// It needs no Python API of its own, so a bare module object is enough (no pybind11).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "REE kernels: registers torch.ops.ree.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}
