/*
 * Exact path-dependent TreeSHAP for XGBoost tree ensembles (shapstream engine kernel).
 *
 * Math.  For one leaf with value v, let F be the set of distinct features on its root
 * path (d = |F|; repeated features are merged as TreeSHAP does: zero fractions multiply,
 * one fractions multiply).  z_j is the product of cover(child)/cover(parent) over the
 * occurrences of feature j on the path; for one row, o_j = 1 iff the row follows the
 * path at every occurrence of j (NaN follows the default direction, categorical splits
 * test set membership), else 0.  Let P = {j : o_j = 1}, w(k) = k!(d-k-1)!/d! and
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
 * On x86-64 CPUs with AVX2 (checked at run time) four rows go through a leaf at once:
 * patterns in 64-bit lanes, the table reads as gathers, the select as a blend; it does
 * the same floating-point operations in the same order as the scalar loop, so results
 * are bit-identical (SHAPSTREAM_NO_SIMD=1 forces the scalar loop).  Rows are processed
 * in blocks of 256 with the trees in the outer loop, so a tree's tables stay in cache.
 *
 * The expected value (bias) is the cover-weighted mean of the leaves, computed with the
 * same recursion xgboost uses.  Everything is single-threaded; the GIL is released
 * while computing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAPSULE_NAME "shapstream.treeshap.Model"
#define MAX_PATH 64
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
    double v;      /* leaf value (direct leaves) */
} Leaf;

typedef struct {
    int32_t feat;
    float thr;
    int32_t self, left, right; /* preorder indices */
    uint8_t default_left, is_cat;
    int32_t cat_nwords;
    int64_t cat_off;
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

static int grow(void **p, int64_t *cap, int64_t need, size_t elsize) {
    if (need <= *cap) return 0;
    int64_t nc = *cap ? *cap : 1024;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, (size_t)nc * elsize);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}

/* ---------------------------------------------------------------- build */

typedef struct {
    /* inputs (flat over all nodes of all trees) */
    const int32_t *left, *right, *feat;
    const float *thr;
    const uint8_t *dleft, *iscat;
    const int64_t *cat_ptr;
    const double *value, *cover;
    int64_t base; /* node offset of the current tree */
    int32_t tree_nodes; /* nodes of the current tree */
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

/* returns the node's mean value (cover weighted, xgboost's recursion) via *mean */
static int build_node(Builder *b, int32_t nid, int32_t *pre_out, double *mean) {
    Model *m = b->m;
    int64_t g = b->base + nid;
    int32_t pre = b->next_pre++;
    *pre_out = pre;
    if (b->depth > 10000 || nid < 0 || nid >= b->tree_nodes) {
        b->err = "tree too deep or bad child index";
        return -2;
    }
    if (b->left[g] < 0) {
        *mean = b->value[g];
        return add_leaf(b, pre, b->value[g]);
    }
    int32_t f = b->feat[g];
    if (f < 0 || f >= m->n_features) {
        b->err = "split feature index out of range";
        return -2;
    }
    if (b->cat_ptr[g] < 0 || b->cat_ptr[g + 1] < b->cat_ptr[g] ||
        b->cat_ptr[g + 1] > m->n_cat_words) {
        b->err = "bad categorical bit field offsets";
        return -2;
    }
    int s = 0;
    while (s < b->ns && b->slot_feat[s] != f) s++;
    int is_new = (s == b->ns);
    if (is_new && b->ns >= MAX_PATH) {
        b->err = "more than 64 distinct features on one tree path";
        return -2;
    }
    if (grow((void **)&m->inodes, &m->cap_inodes, m->n_inodes + 1, sizeof(INode))) return -1;
    int64_t idx = m->n_inodes++;
    {
        INode *in = &m->inodes[idx];
        in->feat = f;
        in->thr = b->thr[g];
        in->self = pre;
        in->default_left = b->dleft[g] ? 1 : 0;
        in->is_cat = b->iscat[g] ? 1 : 0;
        in->cat_off = b->cat_ptr[g];
        in->cat_nwords = (int32_t)(b->cat_ptr[g + 1] - b->cat_ptr[g]);
        in->bit = (uint64_t)1 << s;
        in->newbit = is_new ? in->bit : 0;
    }
    int32_t kids[2] = {b->left[g], b->right[g]};
    int32_t kpre[2];
    double kmean[2];
    double cov = b->cover[g];
    for (int c = 0; c < 2; c++) {
        double ratio = b->cover[b->base + kids[c]] / cov;
        double saved = 0.0;
        if (is_new) {
            b->slot_feat[b->ns] = f;
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
    *mean = (kmean[0] * b->cover[b->base + kids[0]] + kmean[1] * b->cover[b->base + kids[1]]) / cov;
    return 0;
}

static int get_buf(PyObject *o, Py_buffer *v, Py_ssize_t itemsize, const char *name) {
    if (PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (v->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected item size %zd, got %zd", name, itemsize,
                     v->itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* build(n_features, n_groups, dmax, table_limit_bytes, tree_ptr i64, group i32, left i32,
 *       right i32, feat i32, thr f32, dleft u8, iscat u8, cat_ptr i64, cat_words u32,
 *       value f64, cover f64, base f64) -> capsule.  Children are tree-local node ids
 *       (-1 for a leaf); the root is node 0 of each tree. */
static PyObject *py_build(PyObject *self, PyObject *args) {
    (void)self;
    int n_features, n_groups, dmax;
    long long table_limit;
    PyObject *objs[13];
    if (!PyArg_ParseTuple(args, "iiiLOOOOOOOOOOOOO", &n_features, &n_groups, &dmax,
                          &table_limit, &objs[0], &objs[1], &objs[2], &objs[3], &objs[4],
                          &objs[5], &objs[6], &objs[7], &objs[8], &objs[9], &objs[10],
                          &objs[11], &objs[12]))
        return NULL;
    static const Py_ssize_t sizes[13] = {8, 4, 4, 4, 4, 4, 1, 1, 8, 4, 8, 8, 8};
    static const char *names[13] = {"tree_ptr", "group", "left",  "right",   "feat",
                                    "thr",      "dleft", "iscat", "cat_ptr", "cat_words",
                                    "value",    "cover", "base"};
    Py_buffer bufs[13];
    int nb = 0;
    PyObject *result = NULL;
    Model *m = NULL;
    Builder *b = NULL;
    for (; nb < 13; nb++)
        if (get_buf(objs[nb], &bufs[nb], sizes[nb], names[nb]) < 0) goto done;
    if (dmax < 0 || dmax > 20 || n_features <= 0 || n_groups <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad dmax, n_features or n_groups");
        goto done;
    }
    {
        const int64_t *tree_ptr = bufs[0].buf;
        const int32_t *group = bufs[1].buf;
        int n_trees = (int)(bufs[0].len / 8) - 1;
        int64_t n_nodes_total = bufs[2].len / 4;
        if (n_trees < 0 || bufs[1].len / 4 != n_trees || bufs[12].len / 8 != n_groups ||
            bufs[8].len / 8 != n_nodes_total + 1 || tree_ptr[n_trees] != n_nodes_total) {
            PyErr_SetString(PyExc_ValueError, "inconsistent model arrays");
            goto done;
        }
        m = calloc(1, sizeof(Model));
        b = calloc(1, sizeof(Builder));
        if (!m || !b) {
            PyErr_NoMemory();
            goto done;
        }
        m->n_features = n_features;
        m->n_groups = n_groups;
        m->n_trees = n_trees;
        m->dmax = dmax;
        m->trees = calloc((size_t)(n_trees > 0 ? n_trees : 1), sizeof(Tree));
        m->bias = calloc((size_t)n_groups, sizeof(double));
        m->n_cat_words = bufs[9].len / 4;
        m->cat_words = malloc((size_t)(m->n_cat_words > 0 ? m->n_cat_words : 1) * 4);
        int64_t tsize = (int64_t)1 << dmax;
        b->poly = malloc((size_t)(tsize * (dmax + 1)) * sizeof(double));
        b->zin = malloc((size_t)tsize * sizeof(double));
        b->eq = malloc((size_t)tsize * sizeof(double));
        if (!m->trees || !m->bias || !m->cat_words || !b->poly || !b->zin || !b->eq) {
            PyErr_NoMemory();
            goto done;
        }
        if (m->n_cat_words) memcpy(m->cat_words, bufs[9].buf, (size_t)m->n_cat_words * 4);
        memcpy(m->bias, bufs[12].buf, (size_t)n_groups * sizeof(double));
        b->left = bufs[2].buf;
        b->right = bufs[3].buf;
        b->feat = bufs[4].buf;
        b->thr = bufs[5].buf;
        b->dleft = bufs[6].buf;
        b->iscat = bufs[7].buf;
        b->cat_ptr = bufs[8].buf;
        b->value = bufs[10].buf;
        b->cover = bufs[11].buf;
        b->m = m;
        b->table_limit = table_limit;
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS;
        for (int t = 0; t < n_trees && rc == 0; t++) {
            Tree *tr = &m->trees[t];
            if (group[t] < 0 || group[t] >= n_groups || tree_ptr[t + 1] <= tree_ptr[t]) {
                b->err = "bad tree group or empty tree";
                rc = -2;
                break;
            }
            tr->group = group[t];
            tr->inode_off = m->n_inodes;
            tr->leaf_off = m->n_leaves;
            b->base = tree_ptr[t];
            b->tree_nodes = (int32_t)(tree_ptr[t + 1] - tree_ptr[t]);
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
    for (int i = 0; i < nb; i++) PyBuffer_Release(&bufs[i]);
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
    if (isnan(v)) return n->default_left;
    if (!n->is_cat) return v < n->thr;
    /* xgboost: invalid categories (negative or >= 2^24) and categories beyond the stored
     * bit field go left; categories in the node's set go right. */
    if (v < 0.0f || v >= 16777216.0f) return 1;
    uint32_t c = (uint32_t)v;
    uint32_t w = c >> 5;
    if ((int32_t)w >= n->cat_nwords) return 1;
    return !((m->cat_words[n->cat_off + w] >> (c & 31)) & 1u);
}

static void direct_leaf(const Leaf *lf, const Elem *el, uint64_t P, double *phi) {
    /* phi_j from the closed form, O(d^3); used for leaves with d > dmax. */
    int d = lf->d;
    double w[MAX_PATH + 1], poly[MAX_PATH + 2];
    shap_weights(d, w);
    /* j not in P: -v Zc(P) E(P) */
    double zc = 1.0;
    for (int k = 0; k < d; k++)
        if (!((P >> k) & 1)) zc *= el[k].mult;
    int np = 0;
    poly[0] = 1.0;
    for (int k = 0; k < d; k++) {
        if (!((P >> k) & 1)) continue;
        double z = el[k].mult;
        poly[np + 1] = poly[np];
        for (int i = np; i >= 1; i--) poly[i] = poly[i - 1] + z * poly[i];
        poly[0] *= z;
        np++;
    }
    double e = 0.0;
    for (int i = 0; i <= np && i < d; i++) e += w[i] * poly[i];
    double off = -lf->v * zc * e;
    for (int k = 0; k < d; k++) {
        if ((P >> k) & 1) {
            int nq = 0;
            poly[0] = 1.0;
            for (int j = 0; j < d; j++) {
                if (j == k || !((P >> j) & 1)) continue;
                double z = el[j].mult;
                poly[nq + 1] = poly[nq];
                for (int i = nq; i >= 1; i--) poly[i] = poly[i - 1] + z * poly[i];
                poly[0] *= z;
                nq++;
            }
            double eq = 0.0;
            for (int i = 0; i <= nq && i < d; i++) eq += w[i] * poly[i];
            phi[el[k].feat] += lf->v * (1.0 - el[k].mult) * zc * eq;
        } else {
            phi[el[k].feat] += off;
        }
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
static PyObject *py_shap(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *xo, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &cap, &xo, &oo)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!m) return NULL;
    Py_buffer xb, ob;
    if (get_buf(xo, &xb, 4, "x") < 0) return NULL;
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

static PyObject *py_info(PyObject *self, PyObject *args) {
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

static PyObject *py_bias(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!m) return NULL;
    PyObject *lst = PyList_New(m->n_groups);
    if (!lst) return NULL;
    for (int g = 0; g < m->n_groups; g++) PyList_SET_ITEM(lst, g, PyFloat_FromDouble(m->bias[g]));
    return lst;
}

/* ---------------------------------------------------------------- margin predictor
 *
 * Raw margins bit-identical to xgboost 3.x's CPU `inplace_predict(predict_type="margin")`
 * (src/predictor/cpu_predictor.cc, predictor.cc, predict_fn.h):
 *   - the output starts at the intercept in margin space: InitOutPredictions fills each
 *     (row, group) with base_score(group) as a float;
 *   - each tree's leaf value (a float) is added to out(row, tree_info[tree]) in tree order
 *     (PredValueByOneTree: `out_predt(row, gid) += LeafValue`), in float arithmetic.  Row
 *     blocks and the array tree layout only change which rows and nodes are visited
 *     together, not the order of the additions into one output;
 *   - the child taken is LeftChild + !decision, where decision is `x < split_cond` for
 *     numerical splits and "not in the category set (or an invalid category)" for
 *     categorical ones; a NaN takes the default child;
 *   - the intercept is turned into a margin by the objective's ProbToMargin in float:
 *     -logf(1/p - 1) with p clipped to [1e-6, 1 - 1e-6] (logistic), logf(p) (log link),
 *     else unchanged.
 * Single-threaded, plain float arithmetic (no -ffast-math), so the results are exact. */

#define PRED_CAPSULE_NAME "shapstream.treeshap.Predictor"
#define PRED_BLOCK 64
#define PRED_LANES 4 /* trees walked side by side for one row */

enum { LINK_IDENTITY = 0, LINK_LOGIT = 1, LINK_LOG = 2 };

typedef struct {
    float value;      /* split condition, or the leaf value */
    int32_t left;     /* global index of the left child (right = left + 1); -1 for a leaf */
    int32_t feat;
    uint32_t flags;   /* bit 0 default left, bit 1 categorical, bits 2.. category slot */
} PNode;

typedef struct {
    int64_t off;
    int32_t nwords;
} PCat;

typedef struct {
    int n_features, n_groups, n_trees;
    PNode *nodes;
    int64_t n_nodes;
    int32_t *roots;  /* global index of each tree's root */
    int32_t *groups; /* output group of each tree */
    PCat *cats;
    uint32_t *cat_words;
    float *base; /* intercept per group, margin space */
} Predictor;

static void predictor_free(Predictor *p) {
    if (!p) return;
    free(p->nodes);
    free(p->roots);
    free(p->groups);
    free(p->cats);
    free(p->cat_words);
    free(p->base);
    free(p);
}

static void predictor_destructor(PyObject *cap) {
    predictor_free((Predictor *)PyCapsule_GetPointer(cap, PRED_CAPSULE_NAME));
}

/* xgboost's ObjFunction::ProbToMargin for the supported links, in float. */
static float intercept_margin(float score, int link) {
    if (link == LINK_LOGIT) {
        const float eps = 1e-6f; /* kRtEps */
        float p = score < eps ? eps : score;             /* common::Max(score, kRtEps) */
        p = p > 1.0f - eps ? 1.0f - eps : p;             /* common::Min(p, 1 - kRtEps) */
        return -logf(1.0f / p - 1.0f);                   /* common::Logit */
    }
    if (link == LINK_LOG) return logf(score);
    return score;
}

static inline int32_t pred_next(const Predictor *p, const PNode *n, float v) {
    if (isnan(v)) return (n->flags & 1u) ? n->left : n->left + 1;
    if (!(n->flags & 2u)) return n->left + !(v < n->value);
    /* common::Decision: invalid categories and categories past the bit field go left,
     * categories in the node's set go right. */
    if (v < 0.0f || v >= 16777216.0f) return n->left;
    const PCat *c = &p->cats[n->flags >> 2];
    uint32_t code = (uint32_t)v;
    uint32_t w = code >> 5;
    if ((int64_t)w >= c->nwords) return n->left;
    return n->left + (int32_t)((p->cat_words[c->off + w] >> (code & 31)) & 1u);
}

/* predictor(n_features, n_groups, link, tree_ptr i64, group i32, left i32, right i32,
 *           feat i32, value f32, dleft u8, iscat u8, cat_ptr i64, cat_words u32,
 *           base_score f32) -> capsule.  Same node arrays as build(); `value` holds the
 *           split conditions, which are the leaf values at leaves; base_score is the
 *           intercept as stored in the model (before the link). */
static PyObject *py_predictor(PyObject *self, PyObject *args) {
    (void)self;
    int n_features, n_groups, link;
    PyObject *objs[11];
    if (!PyArg_ParseTuple(args, "iiiOOOOOOOOOOO", &n_features, &n_groups, &link, &objs[0],
                          &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &objs[6],
                          &objs[7], &objs[8], &objs[9], &objs[10]))
        return NULL;
    static const Py_ssize_t sizes[11] = {8, 4, 4, 4, 4, 4, 1, 1, 8, 4, 4};
    static const char *names[11] = {"tree_ptr", "group", "left",    "right",     "feat",
                                    "value",    "dleft", "iscat",   "cat_ptr",   "cat_words",
                                    "base_score"};
    Py_buffer bufs[11];
    int nb = 0;
    PyObject *result = NULL;
    Predictor *p = NULL;
    const char *err = NULL;
    for (; nb < 11; nb++)
        if (get_buf(objs[nb], &bufs[nb], sizes[nb], names[nb]) < 0) goto done;
    if (n_features <= 0 || n_groups <= 0 || link < LINK_IDENTITY || link > LINK_LOG) {
        PyErr_SetString(PyExc_ValueError, "bad n_features, n_groups or link");
        goto done;
    }
    {
        const int64_t *tree_ptr = bufs[0].buf;
        const int32_t *group = bufs[1].buf, *left = bufs[2].buf, *right = bufs[3].buf,
                      *feat = bufs[4].buf;
        const float *value = bufs[5].buf, *base_score = bufs[10].buf;
        const uint8_t *dleft = bufs[6].buf, *iscat = bufs[7].buf;
        const int64_t *cat_ptr = bufs[8].buf;
        int64_t n_trees = bufs[0].len / 8 - 1;
        int64_t n_nodes = bufs[2].len / 4;
        int64_t n_words = bufs[9].len / 4;
        if (n_trees < 0 || bufs[1].len / 4 != n_trees || bufs[3].len / 4 != n_nodes ||
            bufs[4].len / 4 != n_nodes || bufs[5].len / 4 != n_nodes ||
            bufs[6].len != n_nodes || bufs[7].len != n_nodes ||
            bufs[8].len / 8 != n_nodes + 1 || bufs[10].len / 4 != n_groups ||
            tree_ptr[0] != 0 || tree_ptr[n_trees] != n_nodes || n_nodes >= INT32_MAX ||
            n_trees >= INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "inconsistent model arrays");
            goto done;
        }
        p = calloc(1, sizeof(Predictor));
        if (!p) {
            PyErr_NoMemory();
            goto done;
        }
        p->n_features = n_features;
        p->n_groups = n_groups;
        p->n_trees = (int)n_trees;
        p->n_nodes = n_nodes;
        int64_t n_cat = 0;
        for (int64_t i = 0; i < n_nodes; i++) n_cat += iscat[i] ? 1 : 0;
        p->nodes = malloc((size_t)(n_nodes > 0 ? n_nodes : 1) * sizeof(PNode));
        p->roots = malloc((size_t)(n_trees > 0 ? n_trees : 1) * sizeof(int32_t));
        p->groups = malloc((size_t)(n_trees > 0 ? n_trees : 1) * sizeof(int32_t));
        p->cats = malloc((size_t)(n_cat > 0 ? n_cat : 1) * sizeof(PCat));
        p->cat_words = malloc((size_t)(n_words > 0 ? n_words : 1) * sizeof(uint32_t));
        p->base = malloc((size_t)n_groups * sizeof(float));
        if (!p->nodes || !p->roots || !p->groups || !p->cats || !p->cat_words || !p->base) {
            PyErr_NoMemory();
            goto done;
        }
        if (n_words) memcpy(p->cat_words, bufs[9].buf, (size_t)n_words * sizeof(uint32_t));
        for (int g = 0; g < n_groups; g++) p->base[g] = intercept_margin(base_score[g], link);
        int64_t slot = 0;
        for (int64_t t = 0; t < n_trees && !err; t++) {
            int64_t lo = tree_ptr[t], hi = tree_ptr[t + 1];
            if (hi <= lo) err = "empty tree";
            else if (group[t] < 0 || group[t] >= n_groups) err = "tree group out of range";
            p->roots[t] = (int32_t)lo;
            p->groups[t] = group[t];
            for (int64_t i = lo; i < hi && !err; i++) {
                PNode *n = &p->nodes[i];
                n->value = value[i];
                n->feat = 0;
                n->flags = 0;
                if (left[i] == -1) { /* RegTree::kInvalidNodeId marks a leaf */
                    n->left = -1;
                    continue;
                }
                /* Children after their parent (so every walk ends at a leaf) and the right
                 * child next to the left one (xgboost walks to LeftChild + 1). */
                int64_t l = left[i];
                if (l <= i - lo || l + 1 >= hi - lo || right[i] != left[i] + 1)
                    err = "unexpected child indices";
                else if (feat[i] < 0 || feat[i] >= n_features)
                    err = "split feature index out of range";
                else if (cat_ptr[i] < 0 || cat_ptr[i + 1] < cat_ptr[i] || cat_ptr[i + 1] > n_words)
                    err = "bad categorical bit field offsets";
                if (err) break;
                n->left = (int32_t)(lo + l);
                n->feat = feat[i];
                n->flags = dleft[i] ? 1u : 0u;
                if (iscat[i]) {
                    if (slot >= (1 << 29)) {
                        err = "too many categorical splits";
                        break;
                    }
                    p->cats[slot].off = cat_ptr[i];
                    p->cats[slot].nwords = (int32_t)(cat_ptr[i + 1] - cat_ptr[i]);
                    n->flags |= 2u | ((uint32_t)slot << 2);
                    slot++;
                }
            }
        }
        if (err) {
            PyErr_SetString(PyExc_ValueError, err);
            goto done;
        }
        result = PyCapsule_New(p, PRED_CAPSULE_NAME, predictor_destructor);
        if (result) p = NULL;
    }
done:
    for (int i = 0; i < nb; i++) PyBuffer_Release(&bufs[i]);
    predictor_free(p);
    return result;
}

static void predict_block(const Predictor *p, const float *x, int64_t n_rows, double *out) {
    const int F = p->n_features, G = p->n_groups;
    float acc[PRED_BLOCK * 8];
    const PNode *nodes = p->nodes;
    /* groups in chunks of 8 keep acc on the stack; each output still sums its trees in
     * tree order starting from the intercept */
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int ng = G - g0 < 8 ? G - g0 : 8;
        for (int64_t r = 0; r < n_rows; r++)
            for (int g = 0; g < ng; g++) acc[r * 8 + g] = p->base[g0 + g];
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
                    float *a = acc + r * 8;
                    for (int k = 0; k < PRED_LANES; k++) a[groups[k]] += nodes[i[k]].value;
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
                acc[r * 8 + g] += nodes[i].value;
            }
        }
        for (int64_t r = 0; r < n_rows; r++)
            for (int g = 0; g < ng; g++) out[r * G + g0 + g] = (double)acc[r * 8 + g];
    }
}

/* predict(capsule, x f32 (rows, features) C-contiguous, out f64 (rows, groups)) -> None.
 * Raises TypeError when x is not a C-contiguous float32 matrix of the model's width. */
static PyObject *py_predict(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
        /* releasing the GIL costs more than scoring a handful of rows */
        const int release = n_rows * (int64_t)p->n_trees >= 16384;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        for (int64_t r0 = 0; r0 < n_rows; r0 += PRED_BLOCK) {
            int64_t nr = n_rows - r0 < PRED_BLOCK ? n_rows - r0 : PRED_BLOCK;
            predict_block(p, x + r0 * F, nr, out + r0 * G);
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

/* predictor_base(capsule) -> the intercept per group in margin space (float32 values) */
static PyObject *py_predictor_base(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap)) return NULL;
    Predictor *p = (Predictor *)PyCapsule_GetPointer(cap, PRED_CAPSULE_NAME);
    if (!p) return NULL;
    PyObject *lst = PyList_New(p->n_groups);
    if (!lst) return NULL;
    for (int g = 0; g < p->n_groups; g++) {
        PyObject *v = PyFloat_FromDouble((double)p->base[g]);
        if (!v) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, g, v);
    }
    return lst;
}

static PyMethodDef methods[] = {
    {"build", py_build, METH_VARARGS, "Parse flat tree arrays and precompute the tables."},
    {"shap", py_shap, METH_VARARGS, "Accumulate SHAP values of a float32 batch into out."},
    {"info", py_info, METH_VARARGS, "Sizes and memory of a built model."},
    {"bias", py_bias, METH_VARARGS, "Expected value per output group."},
    {"predictor", py_predictor, METH_VARARGS, "Build the exact margin predictor."},
    {"predict", (PyCFunction)(void (*)(void))py_predict, METH_FASTCALL,
     "Raw margins of a float32 batch, bit-identical to xgboost's, into a float64 out."},
    {"predictor_base", py_predictor_base, METH_VARARGS, "Intercept per group (margin space)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_treeshap", "Exact path-dependent TreeSHAP kernel.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__treeshap(void) { return PyModule_Create(&moddef); }
