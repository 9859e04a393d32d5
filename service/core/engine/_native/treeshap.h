/*
 * What the SHAP kernel (shap.c) and the margin predictor (predict.c) share: a Forest's arrays
 * as handed over from Python (forest.c reads and checks them), and how an internal node routes
 * a value.
 *
 * A Forest (service/core/formats/base.py) holds every tree's nodes concatenated; a node's
 * children are indices relative to its tree's first node, -1 (any negative) in `left` marks a
 * leaf. Its NodeFlag bits say how a node routes a float32 value x, widened to double:
 *
 *   x = NaN and NAN_AS_ZERO          -> x is read as 0.0
 *   x = NaN, or ZERO_MISSING and |x| <= 1e-35f -> DEFAULT_LEFT
 *   numerical                        -> left iff x <= thr (LESS_EQUAL), else iff x < thr
 *   categorical, x < 0 or x >= 2^24, or code x past the node's bit field -> CAT_OTHER_LEFT
 *   categorical, code in the set     -> left iff CAT_IN_SET_LEFT (out of the set: the opposite)
 *
 * `route_init` folds this into a Route once per node, so that the common case costs what
 * xgboost's own rule costs: a NaN test, then one float32 comparison `x <= c`.
 */
#ifndef SHAPSTREAM_TREESHAP_H
#define SHAPSTREAM_TREESHAP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* NodeFlag (service/core/formats/base.py). */
enum {
    NF_DEFAULT_LEFT = 1,
    NF_CATEGORICAL = 2,
    NF_LESS_EQUAL = 4,
    NF_NAN_AS_ZERO = 8,
    NF_ZERO_MISSING = 16,
    NF_CAT_IN_SET_LEFT = 32,
    NF_CAT_OTHER_LEFT = 64,
    NF_ALL = 127,
};

/* ZERO_MISSING: |x| <= this takes the default direction. */
#define ROUTE_ZERO ((double)1e-35f) /* LightGBM's kZeroThreshold is a float */
/* Category codes are below 2^24 (exact in float32 and float64). */
#define ROUTE_MAX_CODE 16777216.0f

/* Route.flags */
enum {
    RT_NAN_LEFT = 1,     /* where NaN goes (after NAN_AS_ZERO) */
    RT_SPECIAL = 2,      /* not a plain `x <= c`: route_special decides */
    RT_DEFAULT_LEFT = 4,
    RT_ZERO_MISSING = 8,
    RT_CATEGORICAL = 16,
    RT_IN_SET_LEFT = 32,
    RT_OTHER_LEFT = 64,
};

typedef struct {
    /* Numerical: a non-NaN float32 x goes left iff x <= c (NaN c: never). route_init picks
     * the float32 c for which this equals the node's double comparison for every float32. */
    float c;
    uint32_t flags; /* RT_* */
    int64_t cat_off; /* categorical: the set is cat_words[cat_off : cat_off + cat_nwords] */
    int64_t cat_nwords;
} Route;

/* A categorical or zero-missing node, x not NaN. */
static inline int route_special(const Route *r, const uint32_t *cat_words, float x) {
    if ((r->flags & RT_ZERO_MISSING) && fabs((double)x) <= ROUTE_ZERO)
        return (r->flags & RT_DEFAULT_LEFT) != 0;
    if (!(r->flags & RT_CATEGORICAL)) return x <= r->c;
    const int other = (r->flags & RT_OTHER_LEFT) != 0;
    if (!(x >= 0.0f && x < ROUTE_MAX_CODE)) return other;
    const uint32_t code = (uint32_t)x, w = code >> 5;
    if ((int64_t)w >= r->cat_nwords) return other;
    const int in_set = (int)((cat_words[r->cat_off + w] >> (code & 31u)) & 1u);
    return in_set == ((r->flags & RT_IN_SET_LEFT) != 0);
}

/* Whether x goes to the left child. */
static inline int route_left(const Route *r, const uint32_t *cat_words, float x) {
    if (isnan(x)) return (int)(r->flags & RT_NAN_LEFT);
    if (!(r->flags & RT_SPECIAL)) return x <= r->c;
    return route_special(r, cat_words, x);
}

/* A Forest's arrays, borrowed from Python buffers (forest.c); checked: every tree is a tree
 * (children in range, no node reached twice), every split's feature, flags and category
 * offsets valid. */
enum { FOREST_ARRAYS = 12 };

typedef struct {
    int n_features, n_outputs;
    int64_t n_trees, n_nodes, n_words;
    int64_t max_tree_nodes;
    const int64_t *tree_ptr;
    const int32_t *tree_output, *left, *right, *feature;
    const double *threshold;
    const uint8_t *flags;
    const int64_t *cat_ptr;
    const uint32_t *cat_words;
    const double *value, *cover, *base;
    double divisor;
    Py_buffer bufs[FOREST_ARRAYS];
    int n_bufs;
} ForestView;

/* Reads (n_features, n_outputs, tree_ptr, tree_output, left, right, feature, threshold, flags,
 * cat_ptr, cat_words, value, cover, base, divisor) from args[0:15]. Returns 0, or -1 with a
 * Python exception set (ValueError for a malformed forest); forest_close it in both cases. */
int forest_open(ForestView *f, PyObject *const *args);
void forest_close(ForestView *f);

/* The Route of global node i of the forest. */
void route_init(Route *r, const ForestView *f, int64_t i);

/* A buffer of C-contiguous items of `itemsize` bytes, typed `kinds` (struct codes). */
int get_buffer(PyObject *o, Py_buffer *view, Py_ssize_t itemsize, const char *kinds,
               const char *name, int writable);

/* Grows *p (holding *cap items) to hold at least `need`; 0, or -1 out of memory. */
int grow(void **p, int64_t *cap, int64_t need, size_t elsize);

PyObject *py_build(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_shap(PyObject *self, PyObject *args);
PyObject *py_info(PyObject *self, PyObject *args);
PyObject *py_bias(PyObject *self, PyObject *args);
PyObject *py_predictor(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_predict(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
