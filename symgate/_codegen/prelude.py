"""The fixed part of every generated module: imports, the real type, stable primitives, small BLAS helpers.

* ``sg_sigmoid``, ``sg_tanh``, ``sg_softplus``, ``sg_sech2``: overflow-free and branch-free (so
  loops vectorise; ``tanh`` through libmvec's ``expm1``, 2-4x faster here than its ``tanh``;
  ``sech2`` is the tanh derivative without the cancellation of ``1 - tanh**2``);
* ``all_finite``: a NaN/inf test by bit pattern, which ``-ffast-math`` cannot remove;
* ``mm``: row-major ``C = alpha op(A) op(B) + beta C`` through column-major BLAS on the
  transposes, or plain loops (``small_mm``) for products the run plan routes there;
* ``transpose``, ``colsum``, ``axpy``;
* ``bindings_moved``: a prepared step's per-call check that its bound arrays still have the
  data pointer, shape and strides they had when bound.
"""

from __future__ import annotations

import numpy as np

__all__ = ["prelude", "SMALL_GEMM"]

#: tiny matrix products (fewer multiply-adds than this, or fewer than four rows) use plain loops, not BLAS
SMALL_GEMM = 24576

_IMPORTS = """
from libc.math cimport tanh{f}, exp{f}, expm1{f}, copysign{f}, log{f}, log1p{f}, pow{f}, sqrt{f}, fabs{f}
from libc.string cimport memcpy, memset
from libc.stdint cimport {bits}{extra_uint}
from scipy.linalg.cython_blas cimport {gemm}
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_STRIDES

ctypedef {rt} real

CONTENT_HASH = "(pending)"

cdef extern from *:
    ctypedef {rt}* rp "{rt} * __restrict__"

"""

_PRIMITIVES = """cdef inline real sg_sigmoid(real u) noexcept nogil:
    # exp of a non-positive number only (no overflow); branch-free, so loops vectorise
    # (literals typed as real: Cython writes a bare 1 as the double 1.0, promoting float32 to double)
    cdef real one = 1, zero = 0
    cdef real e = exp{f}(-fabs{f}(u))
    cdef real r = one / (one + e)
    return r if u >= zero else e*r


cdef inline real sg_tanh(real u) noexcept nogil:
    # tanh u = sign(u) (1 - e)/(1 + e), e = exp(-2|u|), written with em = expm1(-2|u|) in (-1, 0]
    # as -em/(2 + em): full relative accuracy for small |u| (no 1 - e cancellation), no overflow;
    # branch-free, so loops vectorise through libmvec's expm1 (2-4x faster than its tanh here)
    cdef real two = 2
    cdef real em = expm1{f}(-two*fabs{f}(u))
    return copysign{f}(-em/(two + em), u)


cdef inline real sg_sech2(real u) noexcept nogil:
    # 1 - tanh(u)^2 = 4 e/(1 + e)^2 with e = exp(-2|u|) in (0, 1]: no cancellation where tanh
    # rounds to +-1, no overflow, branch-free
    cdef real one = 1, two = 2, four = 4
    cdef real e = exp{f}(-two*fabs{f}(u))
    cdef real d = one + e
    return four*e/(d*d)


cdef inline real sg_softplus(real u) noexcept nogil:
    cdef real zero = 0
    return (u if u > zero else zero) + log1p{f}(exp{f}(-fabs{f}(u)))


ctypedef {bits} bits_t

"""

_CHECKS = """cdef inline bits_t nonfinite(real v) noexcept nogil:
    # 1 if v is NaN or infinite, by bit pattern (fused into the loops that write values)
    cdef bits_t u
    memcpy(&u, &v, sizeof(real))
    return <bits_t>((u & {expmask}) == {expmask})


cdef bint all_finite(const real* p, Py_ssize_t n) noexcept nogil:
    # by bit pattern: -ffast-math may assume finite floats and drop isfinite() tests
    cdef Py_ssize_t k
    cdef {bits} u, bad = 0
    for k in range(n):
        memcpy(&u, &p[k], sizeof(real))
        bad |= <{bits}>((u & {expmask}) == {expmask})
    return bad == 0


cdef bint finite_double(double v) noexcept nogil:
    cdef uint64_t u
    memcpy(&u, &v, sizeof(double))
    return (u & 0x7ff0000000000000ULL) != 0x7ff0000000000000ULL

"""

_SMALL_MM = """cdef void small_mm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, real alpha, rp A, Py_ssize_t lda,
                   rp Bm, Py_ssize_t ldb, real beta, rp C, Py_ssize_t ldc) noexcept nogil:
    # row-major C = alpha A B + beta C (beta 0 or 1) for small products: blocks of two rows of C
    # are updated by four rows of B at a time, so each loaded row of B serves two rows of C and
    # each element of C is loaded and stored K/4 times
    cdef Py_ssize_t r, k, j
    cdef real a0, a1, a2, a3, e0, e1, e2, e3
    cdef rp c0
    cdef rp c1
    cdef rp b0
    if beta == 0:
        for r in range(M):
            for j in range(N):
                C[r*ldc + j] = 0
    r = 0
    while r + 2 <= M:
        c0 = C + r*ldc
        c1 = c0 + ldc
        k = 0
        while k + 4 <= K:
            a0 = alpha*A[r*lda + k]
            a1 = alpha*A[r*lda + k + 1]
            a2 = alpha*A[r*lda + k + 2]
            a3 = alpha*A[r*lda + k + 3]
            e0 = alpha*A[(r + 1)*lda + k]
            e1 = alpha*A[(r + 1)*lda + k + 1]
            e2 = alpha*A[(r + 1)*lda + k + 2]
            e3 = alpha*A[(r + 1)*lda + k + 3]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j] + a1*b0[ldb + j] + a2*b0[2*ldb + j] + a3*b0[3*ldb + j]
                c1[j] += e0*b0[j] + e1*b0[ldb + j] + e2*b0[2*ldb + j] + e3*b0[3*ldb + j]
            k += 4
        while k < K:
            a0 = alpha*A[r*lda + k]
            e0 = alpha*A[(r + 1)*lda + k]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j]
                c1[j] += e0*b0[j]
            k += 1
        r += 2
    if r < M:
        c0 = C + r*ldc
        k = 0
        while k + 4 <= K:
            a0 = alpha*A[r*lda + k]
            a1 = alpha*A[r*lda + k + 1]
            a2 = alpha*A[r*lda + k + 2]
            a3 = alpha*A[r*lda + k + 3]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j] + a1*b0[ldb + j] + a2*b0[2*ldb + j] + a3*b0[3*ldb + j]
            k += 4
        while k < K:
            a0 = alpha*A[r*lda + k]
            b0 = Bm + k*ldb
            for j in range(N):
                c0[j] += a0*b0[j]
            k += 1

"""

_PRODUCTS = """cdef void mm(bint small, bint ta, bint tb, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, real alpha, real* A, Py_ssize_t lda,
             real* Bm, Py_ssize_t ldb, real beta, real* C, Py_ssize_t ldc) noexcept nogil:
    # row-major C (M x N) = alpha op(A) op(B) + beta C, through column-major BLAS on the transposes, or
    # plain loops where the run plan says so (small: never with transposed operands)
    cdef char ca = b'T' if ta else b'N'
    cdef char cb = b'T' if tb else b'N'
    cdef int m_ = <int>N, n_ = <int>M, k_ = <int>K, la = <int>lda, lb = <int>ldb, lc = <int>ldc
    if M == 0 or N == 0:
        return
    if small:
        small_mm(M, N, K, alpha, A, lda, Bm, ldb, beta, C, ldc)
        return
    {gemm}(&cb, &ca, &m_, &n_, &k_, &alpha, Bm, &lb, A, &la, &beta, C, &lc)


cdef void transpose(Py_ssize_t R, Py_ssize_t C, const real* A, real* AT) noexcept nogil:
    cdef Py_ssize_t r, j
    for r in range(R):
        for j in range(C):
            AT[j*R + r] = A[r*C + j]


cdef void colsum(Py_ssize_t rows, Py_ssize_t n, const real* A, Py_ssize_t lda, real* out) noexcept nogil:
    # out += the column sums of the rows x n block A (leading dimension lda)
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(n):
            out[j] += A[r*lda + j]


cdef void axpy(Py_ssize_t n, real s, const real* x, real* y) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        y[k] += s*x[k]


"""


_BINDINGS = """def bindings_moved(tuple arrays, long long[::1] expect):
    # the index of the first array whose data pointer, ndim, shape or strides differ from expect
    # (per array: pointer, ndim, shape[ndim], strides[ndim]), or -1: a prepared step's check that
    # the arrays it bound were not resized or reallocated since (a few hundred ns for all of them)
    cdef Py_buffer view
    cdef Py_ssize_t i, d, at = 0, nd
    cdef bint moved
    for i in range(len(arrays)):
        PyObject_GetBuffer(arrays[i], &view, PyBUF_STRIDES)
        nd = expect[at + 1]
        moved = <long long>view.buf != expect[at] or view.ndim != nd
        d = 0
        while not moved and d < nd:
            moved = view.shape[d] != expect[at + 2 + d] or view.strides[d] != expect[at + 2 + nd + d]
            d += 1
        PyBuffer_Release(&view)
        if moved:
            return i
        at += 2 + 2*nd
    return -1


"""


def prelude(dtype: np.dtype) -> str:
    """The module text before the context struct, for ``dtype`` (float32 or float64)."""
    single = dtype == np.float32
    fields = {
        "rt": "float" if single else "double",
        "f": "f" if single else "",
        "gemm": "sgemm" if single else "dgemm",
        "bits": "uint32_t" if single else "uint64_t",
        "extra_uint": ", uint64_t" if single else "",
        "expmask": "0x7f800000U" if single else "0x7ff0000000000000ULL",
    }
    parts = (_IMPORTS, _PRIMITIVES, _CHECKS, _SMALL_MM, _PRODUCTS, _BINDINGS)
    return "\n".join(part.format(**fields) for part in parts)
