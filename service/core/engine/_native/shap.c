/*
 * Exact path-dependent TreeSHAP of a Forest (shapstream engine kernel).
 *
 * Math.  For one leaf with value v, let F be the set of distinct features on its root
 * path (d = |F|; repeated features are merged as TreeSHAP does: zero fractions multiply,
 * one fractions multiply).  z_j is the product of cover(child)/cover(parent) over the
 * occurrences of feature j on the path; for one row, o_j = 1 iff the row follows the
 * path at every occurrence of j (routed by the node's Route, treeshap.h), else 0.  Let
 * P = {j : o_j = 1}, w(k) = k!(d-k-1)!/d! and
 *
 *     E(Q) = sum_k w(k) [t^k] prod_{j in Q} (t + z_j),     Zc(Q) = prod_{j not in Q} z_j.
 *
 * Path-dependent TreeSHAP (Lundberg et al., Algorithm 2) then reduces to
 *
 *     j not in P:  phi_j += -v Zc(P) E(P)
 *     j in P:      phi_j +=  v (1 - z_j) Zc(P) E(P \ {j}).
 *
 * For a leaf with d <= dmax we tabulate K(Q) = v Zc(Q) E(Q) over all 2^d subsets once per
 * model.  Since Zc(P\{j}) = z_j Zc(P), the second line is ((1 - z_j) / z_j) K(P \ {j});
 * an element with a (near) zero z_j reads a second table holding (1 - z_j) Zc(Q+j) v E(Q)
 * instead.  Per row and tree the patterns P of all leaves are computed in one preorder
 * pass over the internal nodes (one split decision per node), then each leaf costs d
 * table reads and d accumulations.  Leaves with d > dmax are evaluated directly from the
 * same formula (O(d^3) per row and leaf).
 *
 * The Forest's margin is (base + the trees' leaves) / divisor, so the leaf values are
 * divided by the divisor when the tables are built and the bias is base / divisor plus
 * the trees' cover-weighted mean leaves: the attributions sum to the margin.  A node of
 * zero cover has zero cover ratios and mean (the expectation below it counts for nothing,
 * as in tests/forest_reference.py).
 *
 * On x86-64 CPUs with AVX2 (checked at run time) four rows go through a leaf at once:
 * patterns in 64-bit lanes, the table reads as gathers, the select as a blend; it does
 * the same floating-point operations in the same order as the scalar loop, so results
 * are bit-identical (SHAPSTREAM_NO_SIMD=1 forces the scalar loop).  Rows are processed
 * in blocks of 256 with the trees in the outer loop, so a tree's tables stay in cache.
 *
 * Everything is single-threaded; the GIL is released while computing.
 */
#include "treeshap.h"

#include <stdlib.h>
#include <string.h>

#define CAPSULE_NAME "shapstream.treeshap.Model"
#define MAX_PATH 64
#define MAX_DEPTH 10000
#define Z_EPS 1e-12

typedef double tbl_t;

typedef struct {
    int32_t feat;  /* feature index */
    int32_t alt;   /* offset of the table this element reads, relative to the leaf table */
    double mult;   /* (1 - z) / z (table leaves) or z (direct leaves) */
} Elem;

typedef struct {
    int32_t node;  /* preorder index of the leaf inside its tree */
    int32_t d;     /* distinct features on the path */
    int64_t toff;  /* table offset, -1 for a directly evaluated leaf */
    int64_t eoff;  /* first element */
    double v;      /* leaf value / divisor (direct leaves) */
} Leaf;

typedef struct {
    Route route;
    int32_t feat;
    int32_t self, left, right; /* preorder indices */
    uint64_t newbit, bit;
} INode;

typedef struct {
    int64_t inode_off, n_inodes;
    int64_t leaf_off, n_leaves;
    int32_t n_nodes; /* reachable nodes (pattern scratch size) */
    int32_t group;
} Tree;

typedef struct {
    int n_features, n_groups, n_trees, dmax;
    int max_nodes;
    Tree *trees;
    INode *inodes;
    int64_t n_inodes, cap_inodes;
    Leaf *leaves;
    int64_t n_leaves, cap_leaves;
    Elem *elems;
    int64_t n_elems, cap_elems;
    tbl_t *tables;
    int64_t n_tables, cap_tables;
    uint32_t *cat_words;
    int64_t n_cat_words;
    double *bias; /* per group */
    int64_t n_direct_leaves;
} Model;

static void model_free(Model *m) {
    if (!m) return;
    free(m->trees);
    free(m->inodes);
    free(m->leaves);
    free(m->elems);
    free(m->tables);
    free(m->cat_words);
    free(m->bias);
    free(m);
}

static void capsule_destructor(PyObject *cap) {
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    model_free(m);
}

/* ---------------------------------------------------------------- build */

typedef struct {
    const ForestView *f;
    int64_t base;       /* node offset of the current tree */
    /* path state */
    int ns;
    int32_t slot_feat[MAX_PATH];
    double slot_z[MAX_PATH];
    int32_t next_pre;
    int depth;
    /* scratch for the tables */
    double *poly; /* 2^dmax * (dmax + 1) */
    double *zin;  /* 2^dmax */
    double *eq;   /* 2^dmax */
    double weights[MAX_PATH + 1];
    Model *m;
    int64_t table_limit;
    const char *err;
} Builder;

static void shap_weights(int d, double *w) {
    /* w(k) = k! (d-k-1)! / d! = 1 / (d * C(d-1, k)) */
    double c = 1.0;
    for (int k = 0; k < d; k++) {
        w[k] = 1.0 / ((double)d * c);
        c = c * (double)(d - 1 - k) / (double)(k + 1);
    }
}

static int add_leaf(Builder *b, int32_t pre, double v) {
    Model *m = b->m;
    int d = b->ns;
    if (d == 0) return 0; /* contributes to the bias only */
    if (grow((void **)&m->leaves, &m->cap_leaves, m->n_leaves + 1, sizeof(Leaf))) return -1;
    if (grow((void **)&m->elems, &m->cap_elems, m->n_elems + d, sizeof(Elem))) return -1;
    Leaf *lf = &m->leaves[m->n_leaves++];
    lf->node = pre;
    lf->d = d;
    lf->eoff = m->n_elems;
    lf->v = v;
    Elem *el = &m->elems[m->n_elems];
    m->n_elems += d;
    if (d > m->dmax) {
        lf->toff = -1;
        m->n_direct_leaves++;
        for (int k = 0; k < d; k++) {
            el[k].feat = b->slot_feat[k];
            el[k].alt = 0;
            el[k].mult = b->slot_z[k];
        }
        return 0;
    }
    int64_t size = (int64_t)1 << d;
    int n_alt = 0;
    for (int k = 0; k < d; k++)
        if (b->slot_z[k] < Z_EPS) n_alt++;
    int64_t need = m->n_tables + size * (1 + n_alt);
    if (b->table_limit > 0 && need * (int64_t)sizeof(tbl_t) > b->table_limit) {
        b->err = "table memory limit exceeded";
        return -2;
    }
    if (grow((void **)&m->tables, &m->cap_tables, need, sizeof(tbl_t))) return -1;
    lf->toff = m->n_tables;
    tbl_t *T = m->tables + m->n_tables;
    m->n_tables = need;

    const double *z = b->slot_z;
    double *w = b->weights;
    shap_weights(d, w);
    const int stride = d + 1;
    double *poly = b->poly, *zin = b->zin, *eq = b->eq;
    /* poly[Q] = prod_{j in Q} (t + z_j), zin[Q] = prod_{j in Q} z_j */
    poly[0] = 1.0;
    for (int k = 1; k < stride; k++) poly[k] = 0.0;
    zin[0] = 1.0;
    for (int64_t q = 1; q < size; q++) {
        int j = __builtin_ctzll((unsigned long long)q);
        int64_t pq = q & (q - 1);
        const double *src = poly + pq * stride;
        double *dst = poly + q * stride;
        /* (t + z_j) * src */
        dst[0] = z[j] * src[0];
        for (int k = 1; k < stride; k++) dst[k] = z[j] * src[k] + src[k - 1];
        zin[q] = zin[pq] * z[j];
    }
    for (int64_t q = 0; q < size; q++) {
        const double *pp = poly + q * stride;
        double e = 0.0;
        int nq = __builtin_popcountll((unsigned long long)q);
        for (int k = 0; k <= nq && k < d; k++) e += w[k] * pp[k];
        eq[q] = v * e;
    }
    for (int64_t q = 0; q < size; q++) T[q] = (tbl_t)(zin[(size - 1) ^ q] * eq[q]);
    int a = 0;
    for (int k = 0; k < d; k++) {
        el[k].feat = b->slot_feat[k];
        if (z[k] < Z_EPS) {
            a++;
            tbl_t *A = T + (int64_t)a * size;
            int64_t bk = (int64_t)1 << k;
            for (int64_t q = 0; q < size; q++)
                A[q] = (q & bk) ? (tbl_t)0 : (tbl_t)((1.0 - z[k]) * zin[(size - 1) ^ (q | bk)] * eq[q]);
            el[k].alt = (int32_t)(a * size);
            el[k].mult = 1.0;
        } else {
            el[k].alt = 0;
            el[k].mult = (1.0 - z[k]) / z[k];
        }
    }
    return 0;
}

/* Adds the subtree of tree-local node nid (children checked by forest_open); its mean
 * value (cover weighted, scaled by 1 / divisor) goes to *mean. */
static int build_node(Builder *b, int32_t nid, int32_t *pre_out, double *mean) {
    Model *m = b->m;
    const ForestView *f = b->f;
    const int64_t g = b->base + nid;
    const int32_t pre = b->next_pre++;
    *pre_out = pre;
    if (b->depth > MAX_DEPTH) {
        b->err = "tree too deep";
        return -2;
    }
    if (f->left[g] < 0) {
        const double v = f->value[g] / f->divisor;
        *mean = v;
        return add_leaf(b, pre, v);
    }
    const int32_t feat = f->feature[g];
    int s = 0;
    while (s < b->ns && b->slot_feat[s] != feat) s++;
    const int is_new = (s == b->ns);
    if (is_new && b->ns >= MAX_PATH) {
        b->err = "more than 64 distinct features on one tree path";
        return -2;
    }
    if (grow((void **)&m->inodes, &m->cap_inodes, m->n_inodes + 1, sizeof(INode))) return -1;
    const int64_t idx = m->n_inodes++;
    {
        INode *in = &m->inodes[idx];
        route_init(&in->route, f, g);
        in->feat = feat;
        in->self = pre;
        in->bit = (uint64_t)1 << s;
        in->newbit = is_new ? in->bit : 0;
    }
    const int32_t kids[2] = {f->left[g], f->right[g]};
    int32_t kpre[2];
    double kmean[2];
    const double cov = f->cover[g];
    for (int c = 0; c < 2; c++) {
        const double ratio = cov == 0.0 ? 0.0 : f->cover[b->base + kids[c]] / cov;
        double saved = 0.0;
        if (is_new) {
            b->slot_feat[b->ns] = feat;
            b->slot_z[b->ns] = ratio;
            b->ns++;
        } else {
            saved = b->slot_z[s];
            b->slot_z[s] *= ratio;
        }
        b->depth++;
        int rc = build_node(b, kids[c], &kpre[c], &kmean[c]);
        b->depth--;
        if (is_new) b->ns--;
        else b->slot_z[s] = saved;
        if (rc) return rc;
    }
    INode *in = &m->inodes[idx];
    in->left = kpre[0];
    in->right = kpre[1];
    *mean = cov == 0.0 ? 0.0
                       : (kmean[0] * f->cover[b->base + kids[0]] +
                          kmean[1] * f->cover[b->base + kids[1]]) / cov;
    return 0;
}

/* build(n_features, n_outputs, tree_ptr i64, tree_output i32, left i32, right i32,
 *       feature i32, threshold f64, flags u8, cat_ptr i64, cat_words u32, value f64,
 *       cover f64, base f64, divisor, dmax, table_limit_bytes) -> capsule.
 * The Forest's arrays (service/core/formats/base.py); ValueError when malformed, or with
 * "table memory limit exceeded" when the tables of leaves up to dmax do not fit. */
PyObject *py_build(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 17) {
        PyErr_SetString(PyExc_TypeError, "build() takes 17 arguments");
        return NULL;
    }
    const int dmax = (int)PyLong_AsLong(args[15]);
    const long long table_limit = PyLong_AsLongLong(args[16]);
    if (PyErr_Occurred()) return NULL;
    ForestView f;
    PyObject *result = NULL;
    Model *m = NULL;
    Builder *b = NULL;
    if (forest_open(&f, args) < 0) goto done;
    if (dmax < 0 || dmax > 20) {
        PyErr_SetString(PyExc_ValueError, "dmax must be in [0, 20]");
        goto done;
    }
    {
        const int n_groups = f.n_outputs;
        const int n_trees = (int)f.n_trees;
        m = calloc(1, sizeof(Model));
        b = calloc(1, sizeof(Builder));
        if (!m || !b) {
            PyErr_NoMemory();
            goto done;
        }
        m->n_features = f.n_features;
        m->n_groups = n_groups;
        m->n_trees = n_trees;
        m->dmax = dmax;
        m->trees = calloc((size_t)(n_trees > 0 ? n_trees : 1), sizeof(Tree));
        m->bias = calloc((size_t)n_groups, sizeof(double));
        m->n_cat_words = f.n_words;
        m->cat_words = malloc((size_t)(m->n_cat_words > 0 ? m->n_cat_words : 1) * 4);
        int64_t tsize = (int64_t)1 << dmax;
        b->poly = malloc((size_t)(tsize * (dmax + 1)) * sizeof(double));
        b->zin = malloc((size_t)tsize * sizeof(double));
        b->eq = malloc((size_t)tsize * sizeof(double));
        if (!m->trees || !m->bias || !m->cat_words || !b->poly || !b->zin || !b->eq) {
            PyErr_NoMemory();
            goto done;
        }
        if (m->n_cat_words) memcpy(m->cat_words, f.cat_words, (size_t)m->n_cat_words * 4);
        for (int g = 0; g < n_groups; g++) m->bias[g] = f.base[g] / f.divisor;
        b->f = &f;
        b->m = m;
        b->table_limit = table_limit;
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS;
        for (int t = 0; t < n_trees && rc == 0; t++) {
            Tree *tr = &m->trees[t];
            tr->group = f.tree_output[t];
            tr->inode_off = m->n_inodes;
            tr->leaf_off = m->n_leaves;
            b->base = f.tree_ptr[t];
            b->ns = 0;
            b->next_pre = 0;
            b->depth = 0;
            int32_t root_pre;
            double mean = 0.0;
            rc = build_node(b, 0, &root_pre, &mean);
            tr->n_inodes = m->n_inodes - tr->inode_off;
            tr->n_leaves = m->n_leaves - tr->leaf_off;
            tr->n_nodes = b->next_pre;
            if (b->next_pre > m->max_nodes) m->max_nodes = b->next_pre;
            m->bias[tr->group] += mean;
        }
        Py_END_ALLOW_THREADS;
        if (rc == -1) {
            PyErr_NoMemory();
            goto done;
        }
        if (rc == -2) {
            PyErr_SetString(PyExc_ValueError, b->err ? b->err : "bad model");
            goto done;
        }
        result = PyCapsule_New(m, CAPSULE_NAME, capsule_destructor);
        if (result) m = NULL;
    }
done:
    forest_close(&f);
    if (b) {
        free(b->poly);
        free(b->zin);
        free(b->eq);
        free(b);
    }
    model_free(m);
    return result;
}

/* ---------------------------------------------------------------- evaluate */

static inline int go_left(const Model *m, const INode *n, float v) {
    return route_left(&n->route, m->cat_words, v);
}

/* E(Q) = sum_k w(k) [t^k] prod_{j in Q} (t + z_j) for Q = P without element `skip` (-1: none):
 * the polynomial's coefficients built one factor at a time, in element order. */
static double weighted_poly(const Elem *el, int d, uint64_t P, int skip, const double *w) {
    double poly[MAX_PATH + 2];
    int n = 0;
    poly[0] = 1.0;
    for (int j = 0; j < d; j++) {
        if (j == skip || !((P >> j) & 1)) continue;
        double z = el[j].mult;
        poly[n + 1] = poly[n];
        for (int i = n; i >= 1; i--) poly[i] = poly[i - 1] + z * poly[i];
        poly[0] *= z;
        n++;
    }
    double e = 0.0;
    for (int i = 0; i <= n && i < d; i++) e += w[i] * poly[i];
    return e;
}

static void direct_leaf(const Leaf *lf, const Elem *el, uint64_t P, double *phi) {
    /* phi_j from the closed form, O(d^3); used for leaves with d > dmax. */
    int d = lf->d;
    double w[MAX_PATH + 1];
    shap_weights(d, w);
    /* j not in P: -v Zc(P) E(P) */
    double zc = 1.0;
    for (int k = 0; k < d; k++)
        if (!((P >> k) & 1)) zc *= el[k].mult;
    double off = -lf->v * zc * weighted_poly(el, d, P, -1, w);
    for (int k = 0; k < d; k++) {
        if ((P >> k) & 1)
            phi[el[k].feat] += lf->v * (1.0 - el[k].mult) * zc * weighted_poly(el, d, P, k, w);
        else
            phi[el[k].feat] += off;
    }
}

static void shap_tree(const Model *m, const Tree *tr, const float *x, int64_t n_rows,
                      double *out, uint64_t *pat, double *acc) {
    const int F = m->n_features;
    const int64_t row_stride = (int64_t)m->n_groups * (F + 1);
    const INode *in0 = m->inodes + tr->inode_off;
    const int64_t ni = tr->n_inodes;
    const Leaf *lf0 = m->leaves + tr->leaf_off;
    const int64_t nl = tr->n_leaves;
    const Elem *elems = m->elems;
    const tbl_t *tables = m->tables;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * F;
        double *phi = out + r * row_stride + (int64_t)tr->group * (F + 1);
        pat[0] = 0;
        for (int64_t i = 0; i < ni; i++) {
            const INode *n = &in0[i];
            int gl = go_left(m, n, xr[n->feat]);
            uint64_t p = pat[n->self] | n->newbit;
            uint64_t pc = p & ~n->bit;
            pat[n->left] = gl ? p : pc;
            pat[n->right] = gl ? pc : p;
        }
        /* table leaves accumulate per tree in acc (as the 4-row kernel does) */
        memset(acc, 0, sizeof(double) * (size_t)F);
        for (int64_t l = 0; l < nl; l++) {
            const Leaf *lf = &lf0[l];
            const uint64_t P = pat[lf->node];
            const Elem *el = elems + lf->eoff;
            if (lf->toff < 0) {
                direct_leaf(lf, el, P, phi);
                continue;
            }
            const tbl_t *T = tables + lf->toff;
            const double negk = -(double)T[P];
            uint64_t negk_bits;
            memcpy(&negk_bits, &negk, 8);
            const int d = lf->d;
            for (int k = 0; k < d; k++) {
                const uint64_t bk = (uint64_t)1 << k;
                const double a = el[k].mult * (double)T[el[k].alt + (P ^ bk)];
                /* branch-free select: the pattern bits are unpredictable */
                uint64_t a_bits, mask = (uint64_t)0 - ((P >> k) & 1);
                memcpy(&a_bits, &a, 8);
                const uint64_t r_bits = (a_bits & mask) | (negk_bits & ~mask);
                double r;
                memcpy(&r, &r_bits, 8);
                acc[el[k].feat] += r;
            }
        }
        for (int f = 0; f < F; f++) phi[f] += acc[f];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X4 1
#include <immintrin.h>

/* Four rows at a time with AVX2: the leaf's pattern of each row sits in one 64-bit
 * lane, the two table reads become gathers and the select a blend.  The rows'
 * attributions accumulate lane-wise in acc[(F + 1) * 4] and are added to out per tree.
 * Same arithmetic, in the same order per row, as the scalar loop. */
__attribute__((target("avx2"))) static void shap_tree_x4(const Model *m, const Tree *tr,
                                                         const float *x, int64_t n_rows,
                                                         double *out, uint64_t *pat4,
                                                         double *acc) {
    const int F = m->n_features;
    const int64_t row_stride = (int64_t)m->n_groups * (F + 1);
    const INode *in0 = m->inodes + tr->inode_off;
    const int64_t ni = tr->n_inodes;
    const Leaf *lf0 = m->leaves + tr->leaf_off;
    const int64_t nl = tr->n_leaves;
    const Elem *elems = m->elems;
    const double *tables = m->tables;
    for (int64_t r = 0; r + 4 <= n_rows; r += 4) {
        const float *xr = x + r * F;
        pat4[0] = pat4[1] = pat4[2] = pat4[3] = 0;
        for (int64_t i = 0; i < ni; i++) {
            const INode *n = &in0[i];
            uint64_t *ps = pat4 + 4 * (int64_t)n->self;
            uint64_t *pl = pat4 + 4 * (int64_t)n->left;
            uint64_t *pr = pat4 + 4 * (int64_t)n->right;
            for (int j = 0; j < 4; j++) {
                int gl = go_left(m, n, xr[j * F + n->feat]);
                uint64_t p = ps[j] | n->newbit;
                uint64_t pc = p & ~n->bit;
                pl[j] = gl ? p : pc;
                pr[j] = gl ? pc : p;
            }
        }
        memset(acc, 0, sizeof(double) * 4 * (size_t)F);
        for (int64_t l = 0; l < nl; l++) {
            const Leaf *lf = &lf0[l];
            const Elem *el = elems + lf->eoff;
            const __m256i P = _mm256_loadu_si256((const __m256i *)(pat4 + 4 * (int64_t)lf->node));
            if (lf->toff < 0) {
                uint64_t pp[4];
                _mm256_storeu_si256((__m256i *)pp, P);
                for (int j = 0; j < 4; j++) {
                    double *phi = out + (r + j) * row_stride + (int64_t)tr->group * (F + 1);
                    direct_leaf(lf, el, pp[j], phi);
                }
                continue;
            }
            const double *T = tables + lf->toff;
            const __m256d negk =
                _mm256_sub_pd(_mm256_setzero_pd(), _mm256_i64gather_pd(T, P, 8));
            const int d = lf->d;
            for (int k = 0; k < d; k++) {
                const __m256i bk = _mm256_set1_epi64x((long long)((uint64_t)1 << k));
                const __m256i idx =
                    _mm256_add_epi64(_mm256_xor_si256(P, bk), _mm256_set1_epi64x(el[k].alt));
                const __m256d a =
                    _mm256_mul_pd(_mm256_set1_pd(el[k].mult), _mm256_i64gather_pd(T, idx, 8));
                const __m256d on =
                    _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(P, bk), bk));
                double *ap = acc + 4 * (int64_t)el[k].feat;
                _mm256_storeu_pd(ap, _mm256_add_pd(_mm256_loadu_pd(ap),
                                                   _mm256_blendv_pd(negk, a, on)));
            }
        }
        for (int j = 0; j < 4; j++) {
            double *phi = out + (r + j) * row_stride + (int64_t)tr->group * (F + 1);
            for (int f = 0; f < F; f++) phi[f] += acc[4 * f + j];
        }
    }
}
#endif

/* shap(capsule, x f32 (rows*features), out f64 (rows*groups*(features+1)), zeroed) */
PyObject *py_shap(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *xo, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &cap, &xo, &oo)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!m) return NULL;
    Py_buffer xb, ob;
    if (get_buffer(xo, &xb, 4, "f", "x", 0) < 0) return NULL;
    if (PyObject_GetBuffer(oo, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&xb);
        return NULL;
    }
    PyObject *ret = NULL;
    const int F = m->n_features;
    int64_t n_rows = (int64_t)(xb.len / 4) / F;
    int64_t row_stride = (int64_t)m->n_groups * (F + 1);
    if (ob.itemsize != 8 || (xb.len / 4) % F != 0 || ob.len / 8 != n_rows * row_stride) {
        PyErr_SetString(PyExc_ValueError, "x / out shapes do not match the model");
        goto done;
    }
    {
        uint64_t *pat =
            malloc((size_t)(m->max_nodes > 0 ? m->max_nodes : 1) * 4 * sizeof(uint64_t));
        double *acc = malloc((size_t)F * 4 * sizeof(double));
        if (!pat || !acc) {
            free(pat);
            free(acc);
            PyErr_NoMemory();
            goto done;
        }
        const float *x = xb.buf;
        double *out = ob.buf;
#ifdef HAVE_X4
        const int use_x4 = getenv("SHAPSTREAM_NO_SIMD") == NULL && __builtin_cpu_supports("avx2");
#endif
        Py_BEGIN_ALLOW_THREADS;
        /* rows in blocks so that x and out stay in cache while the trees stream by */
        const int64_t block = 256;
        for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
            int64_t nr = n_rows - r0 < block ? n_rows - r0 : block;
            int64_t done = 0;
#ifdef HAVE_X4
            if (use_x4) {
                done = nr & ~(int64_t)3;
                for (int t = 0; t < m->n_trees && done; t++)
                    shap_tree_x4(m, &m->trees[t], x + r0 * F, done, out + r0 * row_stride, pat,
                                 acc);
            }
#endif
            if (done < nr)
                for (int t = 0; t < m->n_trees; t++)
                    shap_tree(m, &m->trees[t], x + (r0 + done) * F, nr - done,
                              out + (r0 + done) * row_stride, pat, acc);
        }
        for (int64_t r = 0; r < n_rows; r++)
            for (int g = 0; g < m->n_groups; g++) out[r * row_stride + g * (F + 1) + F] += m->bias[g];
        Py_END_ALLOW_THREADS;
        free(pat);
        free(acc);
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    return ret;
}

PyObject *py_info(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!m) return NULL;
    long long bytes = (long long)(m->n_tables * (int64_t)sizeof(tbl_t) +
                                  m->n_elems * (int64_t)sizeof(Elem) +
                                  m->n_leaves * (int64_t)sizeof(Leaf) +
                                  m->n_inodes * (int64_t)sizeof(INode) +
                                  m->n_trees * (int64_t)sizeof(Tree) + m->n_cat_words * 4);
    return Py_BuildValue("{s:i,s:i,s:L,s:L,s:L,s:L,s:L,s:L,s:i}", "trees", m->n_trees,
                         "max_nodes", m->max_nodes, "internal_nodes", (long long)m->n_inodes,
                         "leaves", (long long)m->n_leaves, "path_elements",
                         (long long)m->n_elems, "table_entries", (long long)m->n_tables,
                         "direct_leaves", (long long)m->n_direct_leaves, "bytes", bytes,
                         "table_item_bytes", (int)sizeof(tbl_t));
}

PyObject *py_bias(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!m) return NULL;
    PyObject *lst = PyList_New(m->n_groups);
    if (!lst) return NULL;
    for (int g = 0; g < m->n_groups; g++) {
        PyObject *v = PyFloat_FromDouble(m->bias[g]);
        if (!v) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, g, v);
    }
    return lst;
}
