/*
 * Reading a Forest's arrays from Python and checking them once, for both engines; each
 * node's routing rule folded into a Route (treeshap.h).
 */
#include "treeshap.h"

#include <float.h>
#include <stdlib.h>
#include <string.h>

int grow(void **p, int64_t *cap, int64_t need, size_t elsize) {
    if (need <= *cap) return 0;
    int64_t nc = *cap ? *cap : 1024;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, (size_t)nc * elsize);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}

int get_buffer(PyObject *o, Py_buffer *view, Py_ssize_t itemsize, const char *kinds,
               const char *name, int writable) {
    int how = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, view, how) < 0) return -1;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (view->itemsize != itemsize || strlen(fmt) != 1 || !strchr(kinds, *fmt)) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte items of type %s, got %s", name,
                     itemsize, kinds, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The float32 c such that, for every non-NaN float32 x, `x <= c` holds exactly when the
 * double comparison `(double)x < thr` (or `<= thr` with less_equal) does; NaN (which no x is
 * <=) when none does.  x <= thr iff x <= the largest float32 not above thr; x < thr iff x <=
 * the largest float32 below thr.  Both exist down to -inf, so only thr = -inf (strict) and a
 * NaN threshold have no float32 going left.  Plain IEEE arithmetic (no -ffast-math). */
static float le_bound(double thr, int less_equal) {
    if (isnan(thr)) return NAN;
    float c;
    if (thr > (double)FLT_MAX)
        c = isinf(thr) ? INFINITY : FLT_MAX;
    else if (thr < -(double)FLT_MAX)
        c = -INFINITY;
    else {
        c = (float)thr;
        if ((double)c > thr) c = nextafterf(c, -INFINITY);
    }
    if (!less_equal && (double)c == thr) {
        if (c == -INFINITY) return NAN;
        c = nextafterf(c, -INFINITY);
    }
    return c;
}

void route_init(Route *r, const ForestView *f, int64_t i) {
    const uint8_t nf = f->flags[i];
    memset(r, 0, sizeof(*r));
    r->c = le_bound(f->threshold[i], (nf & NF_LESS_EQUAL) != 0);
    if (nf & NF_DEFAULT_LEFT) r->flags |= RT_DEFAULT_LEFT;
    if (nf & NF_ZERO_MISSING) r->flags |= RT_ZERO_MISSING | RT_SPECIAL;
    if (nf & NF_CATEGORICAL) {
        r->flags |= RT_CATEGORICAL | RT_SPECIAL;
        if (nf & NF_CAT_IN_SET_LEFT) r->flags |= RT_IN_SET_LEFT;
        if (nf & NF_CAT_OTHER_LEFT) r->flags |= RT_OTHER_LEFT;
        r->cat_off = f->cat_ptr[i];
        r->cat_nwords = f->cat_ptr[i + 1] - f->cat_ptr[i];
    }
    /* NaN: the default direction, or wherever 0.0 goes under NAN_AS_ZERO. */
    int nan_left = (nf & NF_DEFAULT_LEFT) != 0;
    if (nf & NF_NAN_AS_ZERO)
        nan_left = (r->flags & RT_SPECIAL) ? route_special(r, f->cat_words, 0.0f) : 0.0f <= r->c;
    if (nan_left) r->flags |= RT_NAN_LEFT;
}

void forest_close(ForestView *f) {
    for (int i = 0; i < f->n_bufs; i++) PyBuffer_Release(&f->bufs[i]);
    f->n_bufs = 0;
}

static int malformed(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return -1;
}

/* Every tree's nodes reached from its root, each once, through children in range; every
 * reached split with a valid feature, known flags and (categorical) a valid set. */
static int check_trees(ForestView *f) {
    int64_t widest = 0;
    for (int64_t t = 0; t < f->n_trees; t++) {
        int64_t n = f->tree_ptr[t + 1] - f->tree_ptr[t];
        if (f->tree_ptr[t] < 0 || n <= 0 || n >= INT32_MAX) return malformed("empty tree");
        if (f->tree_output[t] < 0 || f->tree_output[t] >= f->n_outputs)
            return malformed("tree output out of range");
        if (n > widest) widest = n;
    }
    f->max_tree_nodes = widest;
    int32_t *stack = malloc((size_t)(widest > 0 ? widest : 1) * sizeof(int32_t));
    uint8_t *seen = malloc((size_t)(widest > 0 ? widest : 1));
    if (!stack || !seen) {
        free(stack);
        free(seen);
        PyErr_NoMemory();
        return -1;
    }
    const char *err = NULL;
    for (int64_t t = 0; t < f->n_trees && !err; t++) {
        const int64_t lo = f->tree_ptr[t], n = f->tree_ptr[t + 1] - lo;
        memset(seen, 0, (size_t)n);
        int64_t top = 0;
        stack[top++] = 0;
        seen[0] = 1;
        while (top > 0 && !err) {
            const int64_t g = lo + stack[--top];
            if (f->left[g] < 0) continue;
            const int32_t kids[2] = {f->left[g], f->right[g]};
            if (f->feature[g] < 0 || f->feature[g] >= f->n_features)
                err = "split feature index out of range";
            else if (f->flags[g] & ~NF_ALL)
                err = "unknown node flags";
            else if ((f->flags[g] & NF_CATEGORICAL) &&
                     (f->cat_ptr[g] < 0 || f->cat_ptr[g + 1] < f->cat_ptr[g] ||
                      f->cat_ptr[g + 1] > f->n_words))
                err = "bad categorical bit field offsets";
            for (int c = 0; c < 2 && !err; c++) {
                if (kids[c] < 0 || kids[c] >= n) err = "child index out of range";
                else if (seen[kids[c]]) err = "a node is reached twice (not a tree)";
                else {
                    seen[kids[c]] = 1;
                    stack[top++] = kids[c];
                }
            }
        }
    }
    free(stack);
    free(seen);
    return err ? malformed(err) : 0;
}

/* A Python int as a C int; -1 when out of range (the caller rejects it). */
static int small_int(PyObject *o) {
    long v = PyLong_AsLong(o);
    return v < 0 || v > INT32_MAX ? -1 : (int)v;
}

int forest_open(ForestView *f, PyObject *const *args) {
    memset(f, 0, sizeof(*f));
    f->n_features = small_int(args[0]);
    f->n_outputs = small_int(args[1]);
    f->divisor = PyFloat_AsDouble(args[14]);
    if (PyErr_Occurred()) return -1;
    static const Py_ssize_t sizes[FOREST_ARRAYS] = {8, 4, 4, 4, 4, 8, 1, 8, 4, 8, 8, 8};
    static const char *kinds[FOREST_ARRAYS] = {"ql", "i", "i",  "i", "i", "d",
                                               "B",  "ql", "I", "d", "d", "d"};
    static const char *names[FOREST_ARRAYS] = {
        "tree_ptr", "tree_output", "left",      "right", "feature", "threshold",
        "flags",    "cat_ptr",     "cat_words", "value", "cover",   "base"};
    for (; f->n_bufs < FOREST_ARRAYS; f->n_bufs++) {
        int i = f->n_bufs;
        if (get_buffer(args[2 + i], &f->bufs[i], sizes[i], kinds[i], names[i], 0) < 0) return -1;
    }
    Py_buffer *b = f->bufs;
    f->tree_ptr = b[0].buf;
    f->tree_output = b[1].buf;
    f->left = b[2].buf;
    f->right = b[3].buf;
    f->feature = b[4].buf;
    f->threshold = b[5].buf;
    f->flags = b[6].buf;
    f->cat_ptr = b[7].buf;
    f->cat_words = b[8].buf;
    f->value = b[9].buf;
    f->cover = b[10].buf;
    f->base = b[11].buf;
    f->n_trees = b[0].len / 8 - 1;
    f->n_nodes = b[2].len / 4;
    f->n_words = b[8].len / 4;
    if (f->n_features <= 0 || f->n_outputs <= 0)
        return malformed("n_features and n_outputs must be positive");
    if (!(f->divisor > 0.0) || isinf(f->divisor))
        return malformed("divisor must be positive and finite");
    const int64_t n = f->n_nodes;
    if (f->n_trees < 0 || b[1].len / 4 != f->n_trees || b[3].len / 4 != n ||
        b[4].len / 4 != n || b[5].len / 8 != n || b[6].len != n || b[7].len / 8 != n + 1 ||
        b[9].len / 8 != n || b[10].len / 8 != n || b[11].len / 8 != f->n_outputs ||
        f->tree_ptr[0] != 0 || f->tree_ptr[f->n_trees] != n || n >= INT32_MAX ||
        f->n_trees >= INT32_MAX)
        return malformed("inconsistent forest arrays");
    return check_trees(f);
}
