/*
 * Raw margins of a Forest, bit-identical to its framework's own scoring:
 *   - each output starts at its base: float32(base) under FLOAT32 accumulation (xgboost's
 *     InitOutPredictions), the double itself under FLOAT64;
 *   - each tree's leaf is added to the output its tree names, in tree order, in float32
 *     (xgboost's `out_predt(row, gid) += LeafValue`) or in double;
 *   - the sum, as a double, is divided by the divisor (scikit-learn's `proba /=
 *     n_estimators`; skipped when it is 1, which changes no bit).
 * Rows are routed by each node's Route (treeshap.h).  Row blocks, output chunks and the
 * 4-lane walk only change which rows and nodes are visited together, never the order of
 * the additions into one output.
 *
 * Layout: each tree's reachable nodes are laid out breadth first, so a right child always
 * sits next to its left sibling (the walk goes to left + !go_left) and a tree's top levels
 * share cache lines.  A plain numerical split keeps its whole rule in its 16-byte node;
 * categorical and zero-missing splits point into a side array of Routes.
 * Single-threaded, plain IEEE arithmetic (no -ffast-math), so the results are exact.
 */
#include "treeshap.h"

#include <stdlib.h>
#include <string.h>

#define PRED_CAPSULE_NAME "shapstream.treeshap.Predictor"
#define PRED_BLOCK 64
#define PRED_LANES 4  /* trees walked side by side for one row */
#define PRED_GROUPS 8 /* outputs accumulated at once (the accumulators stay on the stack) */

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* PNode.u.split.bits: where NaN goes, whether the Route in the side array decides, and
 * that Route's index (bits >> PN_SLOT_SHIFT). */
enum { PN_NAN_LEFT = 1, PN_SPECIAL = 2, PN_SLOT_SHIFT = 2 };
#define PN_MAX_SLOTS ((int64_t)1 << 30)

typedef struct {
    int32_t left; /* index of the left child (the right one is left + 1); -1 at a leaf */
    int32_t feat;
    union {
        struct {
            float c; /* Route.c */
            uint32_t bits;
        } split;
        float leaf32;  /* FLOAT32 accumulation */
        double leaf64; /* FLOAT64 accumulation */
    } u;
} PNode;

typedef struct {
    int n_features, n_groups, n_trees;
    int wide;   /* FLOAT64 accumulation */
    int divide; /* divisor != 1 */
    double divisor;
    PNode *nodes;
    int64_t n_nodes;
    int32_t *roots;  /* index of each tree's root */
    int32_t *groups; /* output of each tree */
    Route *special;
    int64_t n_special, cap_special;
    uint32_t *cat_words;
    double *base; /* per output */
} Predictor;

static void predictor_free(Predictor *p) {
    if (!p) return;
    free(p->nodes);
    free(p->roots);
    free(p->groups);
    free(p->special);
    free(p->cat_words);
    free(p->base);
    free(p);
}

static void predictor_destructor(PyObject *cap) {
    predictor_free((Predictor *)PyCapsule_GetPointer(cap, PRED_CAPSULE_NAME));
}

static inline int32_t pred_next(const Predictor *p, const PNode *n, float v) {
    const uint32_t bits = n->u.split.bits;
    if (isnan(v)) return n->left + !(bits & PN_NAN_LEFT);
    if (!(bits & PN_SPECIAL)) return n->left + !(v <= n->u.split.c);
    return n->left + !route_special(&p->special[bits >> PN_SLOT_SHIFT], p->cat_words, v);
}

/* Lays tree t out breadth first from nodes[start]; returns its node count, or -1 (out of
 * memory or too many special splits, with *err set). */
static int64_t layout_tree(Predictor *p, const ForestView *f, int64_t t, int64_t start,
                           int32_t *queue, const char **err) {
    const int64_t lo = f->tree_ptr[t];
    int64_t head = 0, tail = 1;
    queue[0] = 0;
    for (; head < tail; head++) {
        const int64_t g = lo + queue[head];
        PNode *n = &p->nodes[start + head];
        memset(n, 0, sizeof(*n));
        if (f->left[g] < 0) {
            n->left = -1;
            if (p->wide) n->u.leaf64 = f->value[g];
            else n->u.leaf32 = (float)f->value[g];
            continue;
        }
        Route r;
        route_init(&r, f, g);
        n->left = (int32_t)(start + tail);
        n->feat = f->feature[g];
        n->u.split.c = r.c;
        n->u.split.bits = (r.flags & RT_NAN_LEFT) ? PN_NAN_LEFT : 0;
        if (r.flags & RT_SPECIAL) {
            if (p->n_special >= PN_MAX_SLOTS) {
                *err = "too many categorical or zero-missing splits";
                return -1;
            }
            if (grow((void **)&p->special, &p->cap_special, p->n_special + 1, sizeof(Route))) {
                *err = NULL;
                return -1;
            }
            p->special[p->n_special] = r;
            n->u.split.bits |= PN_SPECIAL | ((uint32_t)p->n_special << PN_SLOT_SHIFT);
            p->n_special++;
        }
        queue[tail++] = f->left[g]; /* forest_open checked: in range, each reached once */
        queue[tail++] = f->right[g];
    }
    return tail;
}

/* predictor(n_features, n_outputs, tree_ptr i64, tree_output i32, left i32, right i32,
 *           feature i32, threshold f64, flags u8, cat_ptr i64, cat_words u32, value f64,
 *           cover f64, base f64, divisor, float64_accumulation) -> capsule.
 * The Forest's arrays (service/core/formats/base.py; cover is not read); ValueError when
 * malformed. */
PyObject *py_predictor(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 16) {
        PyErr_SetString(PyExc_TypeError, "predictor() takes 16 arguments");
        return NULL;
    }
    const int wide = PyObject_IsTrue(args[15]);
    if (wide < 0) return NULL;
    ForestView f;
    PyObject *result = NULL;
    Predictor *p = NULL;
    int32_t *queue = NULL;
    if (forest_open(&f, args) < 0) goto done;
    {
        const int64_t n_trees = f.n_trees;
        p = calloc(1, sizeof(Predictor));
        if (!p) {
            PyErr_NoMemory();
            goto done;
        }
        p->n_features = f.n_features;
        p->n_groups = f.n_outputs;
        p->n_trees = (int)n_trees;
        p->wide = wide;
        p->divisor = f.divisor;
        p->divide = f.divisor != 1.0;
        p->nodes = malloc((size_t)(f.n_nodes > 0 ? f.n_nodes : 1) * sizeof(PNode));
        p->roots = malloc((size_t)(n_trees > 0 ? n_trees : 1) * sizeof(int32_t));
        p->groups = malloc((size_t)(n_trees > 0 ? n_trees : 1) * sizeof(int32_t));
        p->cat_words = malloc((size_t)(f.n_words > 0 ? f.n_words : 1) * sizeof(uint32_t));
        p->base = malloc((size_t)f.n_outputs * sizeof(double));
        queue = malloc((size_t)(f.max_tree_nodes > 0 ? f.max_tree_nodes : 1) * sizeof(int32_t));
        if (!p->nodes || !p->roots || !p->groups || !p->cat_words || !p->base || !queue) {
            PyErr_NoMemory();
            goto done;
        }
        if (f.n_words) memcpy(p->cat_words, f.cat_words, (size_t)f.n_words * sizeof(uint32_t));
        memcpy(p->base, f.base, (size_t)f.n_outputs * sizeof(double));
        int64_t used = 0;
        for (int64_t t = 0; t < n_trees; t++) {
            const char *err = NULL;
            p->roots[t] = (int32_t)used;
            p->groups[t] = f.tree_output[t];
            const int64_t n = layout_tree(p, &f, t, used, queue, &err);
            if (n < 0) {
                if (err) PyErr_SetString(PyExc_ValueError, err);
                else PyErr_NoMemory();
                goto done;
            }
            used += n;
        }
        p->n_nodes = used;
        result = PyCapsule_New(p, PRED_CAPSULE_NAME, predictor_destructor);
        if (result) p = NULL;
    }
done:
    forest_close(&f);
    free(queue);
    predictor_free(p);
    return result;
}

/* One block of rows; `wide` is a constant in each caller, so each gets its own loop. */
static ALWAYS_INLINE void predict_block_as(const Predictor *p, const float *x, int64_t n_rows,
                                           double *out, const int wide) {
    const int F = p->n_features, G = p->n_groups;
    float acc32[PRED_BLOCK * PRED_GROUPS];
    double acc64[PRED_BLOCK * PRED_GROUPS];
    const PNode *nodes = p->nodes;
#define ACC_ADD(slot, node)                                  \
    do {                                                     \
        if (wide) acc64[slot] += (node)->u.leaf64;           \
        else acc32[slot] += (node)->u.leaf32;                \
    } while (0)
    /* outputs in chunks keep the accumulators on the stack; each output still sums its
     * trees in tree order starting from its base */
    for (int g0 = 0; g0 < G; g0 += PRED_GROUPS) {
        const int ng = G - g0 < PRED_GROUPS ? G - g0 : PRED_GROUPS;
        for (int64_t r = 0; r < n_rows; r++)
            for (int g = 0; g < ng; g++) {
                if (wide) acc64[r * PRED_GROUPS + g] = p->base[g0 + g];
                else acc32[r * PRED_GROUPS + g] = (float)p->base[g0 + g];
            }
        int t = 0;
        if (ng == G) {
            /* PRED_LANES trees walked side by side (independent load chains), their leaves
             * then added one by one in tree order. */
            for (; t + PRED_LANES <= p->n_trees; t += PRED_LANES) {
                const int32_t *roots = p->roots + t, *groups = p->groups + t;
                for (int64_t r = 0; r < n_rows; r++) {
                    const float *xr = x + r * F;
                    int32_t i[PRED_LANES];
                    for (int k = 0; k < PRED_LANES; k++) i[k] = roots[k];
                    for (;;) {
                        int live = 0;
                        for (int k = 0; k < PRED_LANES; k++) {
                            const PNode *n = &nodes[i[k]];
                            if (n->left >= 0) {
                                i[k] = pred_next(p, n, xr[n->feat]);
                                live = 1;
                            }
                        }
                        if (!live) break;
                    }
                    for (int k = 0; k < PRED_LANES; k++)
                        ACC_ADD(r * PRED_GROUPS + groups[k], &nodes[i[k]]);
                }
            }
        }
        for (; t < p->n_trees; t++) {
            const int g = p->groups[t] - g0;
            if (g < 0 || g >= ng) continue;
            const int32_t root = p->roots[t];
            for (int64_t r = 0; r < n_rows; r++) {
                const float *xr = x + r * F;
                int32_t i = root;
                while (nodes[i].left >= 0) i = pred_next(p, &nodes[i], xr[nodes[i].feat]);
                ACC_ADD(r * PRED_GROUPS + g, &nodes[i]);
            }
        }
        for (int64_t r = 0; r < n_rows; r++)
            for (int g = 0; g < ng; g++) {
                const int slot = (int)r * PRED_GROUPS + g;
                const double sum = wide ? acc64[slot] : (double)acc32[slot];
                out[r * G + g0 + g] = p->divide ? sum / p->divisor : sum;
            }
    }
#undef ACC_ADD
}

static void predict_block_f32(const Predictor *p, const float *x, int64_t n, double *out) {
    predict_block_as(p, x, n, out, 0);
}

static void predict_block_f64(const Predictor *p, const float *x, int64_t n, double *out) {
    predict_block_as(p, x, n, out, 1);
}

/* predict(capsule, x f32 (rows, features) C-contiguous, out f64 (rows, outputs)) -> None.
 * Raises TypeError when x is not a C-contiguous float32 matrix of the model's width. */
PyObject *py_predict(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "predict(model, x, out) takes 3 arguments");
        return NULL;
    }
    Predictor *p = (Predictor *)PyCapsule_GetPointer(args[0], PRED_CAPSULE_NAME);
    if (!p) return NULL;
    Py_buffer xb, ob;
    if (PyObject_GetBuffer(args[1], &xb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(args[2], &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) <
        0) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    PyObject *ret = NULL;
    const int F = p->n_features, G = p->n_groups;
    if (xb.ndim != 2 || xb.itemsize != 4 || !xb.format || strcmp(xb.format, "f") != 0 ||
        xb.shape[1] != F) {
        PyErr_SetString(PyExc_TypeError, "x must be a C-contiguous float32 (rows, features)");
        goto done;
    }
    const int64_t n_rows = xb.shape[0];
    if (ob.ndim != 2 || ob.itemsize != 8 || !ob.format || strcmp(ob.format, "d") != 0 ||
        ob.shape[0] != n_rows || ob.shape[1] != G) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous float64 (rows, outputs)");
        goto done;
    }
    {
        const float *x = xb.buf;
        double *out = ob.buf;
        void (*block)(const Predictor *, const float *, int64_t, double *) =
            p->wide ? predict_block_f64 : predict_block_f32;
        /* releasing the GIL costs more than scoring a handful of rows */
        const int release = n_rows * (int64_t)p->n_trees >= 16384;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        for (int64_t r0 = 0; r0 < n_rows; r0 += PRED_BLOCK) {
            int64_t nr = n_rows - r0 < PRED_BLOCK ? n_rows - r0 : PRED_BLOCK;
            block(p, x + r0 * F, nr, out + r0 * G);
        }
        if (ts) PyEval_RestoreThread(ts);
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    return ret;
}
