// The Python module s2h_kernels._C: importing it loads the library, which runs the op
// registrations (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks of csrc/cpu, csrc/cuda), and it
// exposes the CPU configuration (csrc/cpu/cpu_isa.h) to s2h_kernels/_cpu_config.py. Plain Python
// C API, no pybind11: that would pull torch/extension.h into this file.
#include <Python.h>

#include <c10/util/Exception.h>

#include <exception>

#include "cpu/cpu_isa.h"

namespace {

// Runs f, turning a C++ exception into a Python RuntimeError (nullptr).
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(s2h::cpu::isa_name(s2h::cpu::active_isa())); });
}

PyObject* best_cpu_isa(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(s2h::cpu::isa_name(s2h::cpu::best_isa())); });
}

PyObject* reload_cpu_config(PyObject*, PyObject*) {
  return guarded([] {
    s2h::cpu::reload_cpu_config();
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA level the CPU kernels run (S2H_CPU_ISA, or the best this CPU runs)."},
    {"best_cpu_isa", best_cpu_isa, METH_NOARGS, "The best ISA level this CPU runs."},
    {"reload_cpu_config", reload_cpu_config, METH_NOARGS,
     "Re-reads S2H_CPU_ISA and the S2H_SPMM_* knobs from the environment (tests, measurements)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
