/*
 * The _treeshap extension module: exact TreeSHAP (shap.c) and the margin predictor
 * (predict.c) of a Forest (service/core/formats/base.py), both reading it through forest.c.
 */
#include "treeshap.h"

#define FASTCALL(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef methods[] = {
    {"build", FASTCALL(py_build), METH_FASTCALL,
     "Check a Forest's arrays and precompute its TreeSHAP tables."},
    {"shap", py_shap, METH_VARARGS, "Accumulate SHAP values of a float32 batch into out."},
    {"info", py_info, METH_VARARGS, "Sizes and memory of a built model."},
    {"bias", py_bias, METH_VARARGS, "Expected value per output (margin space)."},
    {"predictor", FASTCALL(py_predictor), METH_FASTCALL,
     "Check a Forest's arrays and lay them out for scoring."},
    {"predict", FASTCALL(py_predict), METH_FASTCALL,
     "Raw margins of a float32 batch into a float64 out, as the Forest's framework adds them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_treeshap", "Exact path-dependent TreeSHAP and margins of a Forest.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__treeshap(void) { return PyModule_Create(&moddef); }
