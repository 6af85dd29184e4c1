/*
 * uksm.kernel._lockcore: the uncontended path of the lock protocol in C.
 *
 * uksm/kernel/locks.py is the protocol's reference: its top comment says
 * what every word transition means and how recover() counts a dead
 * holder's units from them.  This file does the very same steps, in the
 * same order, for the three operations every fault, page write and ksmd
 * merge does several times (mutex_lock/down_read, mutex_trylock,
 * mutex_unlock/up_read):
 *
 *   lock:    E_LOCK = lock; word -> WAITING; sem_trywait [window A];
 *            word -> HELD
 *   unlock:  word -> RELEASING; sem_post [window B]; word -> IDLE
 *
 * Everything else -- a wait that blocks (Task._block: slices, E_SPINS,
 * E_SINCE, the abort hook, lock_wait), down_write/up_write, the lockdep and
 * use-after-free hooks, recover() -- stays in Python and is called from
 * here when needed, so one piece of code serves each of them.
 *
 * A controlled run (uksm.kernel.sched) sets ``sched`` on the task: it is
 * called before lock, trylock and unlock (the scheduling points of every
 * lock operation; before the unlock's use-after-free check, which reads
 * the mm's row without a lock), as the lockdep hook is called -- a normal
 * run pays one pointer test per operation.
 *
 * Why C: in Python the protocol's bookkeeping (five word accesses, two
 * hook tests, a method call) cost 0.42 us of a 0.56 us lock/unlock pair,
 * against 0.14 us for the semaphore itself; a page write holds the pte
 * lock once, a first-touch fault takes three locks.
 *
 * Crash consistency is unchanged: a SIGKILL lands between any two
 * instructions here as it did between two bytecodes, and each store is a
 * single aligned 64-bit store (__atomic_store_n, release: on x86 a plain
 * mov).  recover() relies on the order of each word store and the
 * semaphore operation next to it.  A release store keeps earlier accesses
 * before it (the HELD/IDLE store after sem_trywait/sem_post); it does not
 * keep a later operation after it, so the WAITING and RELEASING stores are
 * followed by a full fence before the semaphore operation (order_before_sem:
 * nothing on x86, whose sem_trywait/sem_post are locked instructions and
 * stores are not reordered with them; a dmb on aarch64, instead of relying
 * on glibc's CAS being acquire/release).
 * A Python signal handler can no longer run inside the operation (it runs
 * at the next bytecode, after the word is settled): one window fewer, none
 * added.
 *
 * A Lock's semaphore is used through the sem_t this process maps for the
 * semaphore's name (glibc's sem_open returns the mapping posix_ipc already
 * has): the Lock is made right after posix_ipc opened that name, in the
 * same call (Cluster), so both name one semaphore -- a uksm name is made
 * again only by a new cluster of that name, after the old one's processes
 * are gone.  When ``sem`` is anything but a posix_ipc.Semaphore itself (a
 * test's spy, None), or after close(), every semaphore operation goes
 * through its Python methods, exactly as in locks.py (a closed one raises
 * posix_ipc's ExistentialError there, as the reference does).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdint.h>

#define MAX_CLASSES 16
enum { IDLE = 0, WAITING = 1, HELD = 2, RELEASING = 3 };

/* the layout's offsets, given once by locks.py (layout()) */
static Py_ssize_t E_LOCK = -1, E_WORD = -1, M_ID = -1, M_STATE = -1;
static int64_t MMS_FREEING = -1, MMS_FREE = -1;

static PyObject *SemaphoreType;   /* posix_ipc.Semaphore */
static PyObject *s_close;
static PyObject *BusyError;       /* posix_ipc.BusyError */
static PyObject *s_acquire, *s_release, *s_block, *s_lockdep_check, *s_holds,
                *s_recursive, *s_lock, *s_trylock, *s_unlock, *s_check, *s_lk, *s_zero;

/* ---- Lock ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *sem;        /* the posix_ipc.Semaphore (or a stand-in) */
    sem_t *psem;          /* its mapping here, or NULL: use sem's methods */
    PyObject *name;
    long long units, cls, lid, mm, mmrow, mmbase;
} LockObject;

static void lock_drop_psem(LockObject *lk)
{
    if (lk->psem != NULL) {
        sem_close(lk->psem);
        lk->psem = NULL;
    }
}

/* Map ``sem``'s semaphore when it is a posix_ipc.Semaphore; else NULL. */
static int lock_set_sem(LockObject *lk, PyObject *sem)
{
    lock_drop_psem(lk);
    Py_INCREF(sem);
    Py_XSETREF(lk->sem, sem);
    /* the type itself: a subclass may override acquire/release */
    if (SemaphoreType == NULL || !Py_IS_TYPE(sem, (PyTypeObject *)SemaphoreType))
        return 0;
    PyObject *name = PyObject_GetAttrString(sem, "name");
    if (name == NULL)
        return -1;
    const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    if (s != NULL) {
        sem_t *p = sem_open(s, 0);
        /* gone already (unlinked): the Python path reports what it meets */
        lk->psem = p == SEM_FAILED ? NULL : p;
    }
    Py_DECREF(name);
    PyErr_Clear();
    return 0;
}

static int Lock_init(LockObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"sem", "units", "cls", "lid", "name", "mm", NULL};
    PyObject *sem, *name;
    long long units, cls, lid, mm = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLLLU|L", kwlist, &sem, &units, &cls, &lid,
                                     &name, &mm))
        return -1;
    if (cls < 0 || cls >= MAX_CLASSES) {
        PyErr_Format(PyExc_ValueError, "lock class %lld out of range", cls);
        return -1;
    }
    self->units = units;
    self->cls = cls;
    self->lid = lid;
    self->mm = mm;
    self->mmrow = -1;
    self->mmbase = -1;
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    return lock_set_sem(self, sem);
}

static PyObject *Lock_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    /* never NULL, even before __init__ */
    self->sem = Py_NewRef(Py_None);
    self->name = PyUnicode_FromString("");
    self->mmrow = self->mmbase = -1;
    if (self->name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Lock_traverse(LockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sem);
    Py_VISIT(self->name);
    return 0;
}

static int Lock_clear(LockObject *self)
{
    lock_drop_psem(self);
    Py_CLEAR(self->sem);
    Py_CLEAR(self->name);
    return 0;
}

static void Lock_dealloc(LockObject *self)
{
    PyObject_GC_UnTrack(self);
    Lock_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* close(): this process is done with the semaphore (Cluster.forget_mm,
 * Cluster.close): the C path's mapping dropped first, then posix_ipc's
 * handle closed; a later operation raises as the reference's would. */
static PyObject *Lock_close(LockObject *self, PyObject *unused)
{
    lock_drop_psem(self);
    return PyObject_CallMethodNoArgs(self->sem, s_close);
}

static PyMethodDef Lock_methods[] = {
    {"close", (PyCFunction)Lock_close, METH_NOARGS, "close the semaphore (posix_ipc's close)"},
    {NULL}
};

static PyObject *Lock_get_sem(LockObject *self, void *closure)
{
    return Py_NewRef(self->sem != NULL ? self->sem : Py_None);
}

static int Lock_set_sem(LockObject *self, PyObject *v, void *closure)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete sem");
        return -1;
    }
    return lock_set_sem(self, v);
}

static PyObject *Lock_get_fast(LockObject *self, void *closure)
{
    return PyBool_FromLong(self->psem != NULL);
}

static PyGetSetDef Lock_getset[] = {
    {"sem", (getter)Lock_get_sem, (setter)Lock_set_sem, "the semaphore", NULL},
    {"fast", (getter)Lock_get_fast, NULL, "semaphore operations done in C (sem_t mapped)", NULL},
    {NULL}
};

static PyMemberDef Lock_members[] = {
    {"name", T_OBJECT, offsetof(LockObject, name), READONLY, NULL},
    {"units", T_LONGLONG, offsetof(LockObject, units), READONLY, NULL},
    {"cls", T_LONGLONG, offsetof(LockObject, cls), READONLY, NULL},
    {"lid", T_LONGLONG, offsetof(LockObject, lid), READONLY, NULL},
    {"mm", T_LONGLONG, offsetof(LockObject, mm), READONLY, NULL},
    {"mmrow", T_LONGLONG, offsetof(LockObject, mmrow), 0, NULL},
    {"mmbase", T_LONGLONG, offsetof(LockObject, mmbase), 0, NULL},
    {NULL}
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "uksm.kernel._lockcore.LockCore",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A lock's fields, and its semaphore mapped for the C path.",
    .tp_new = Lock_new,
    .tp_init = (initproc)Lock_init,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_traverse = (traverseproc)Lock_traverse,
    .tp_clear = (inquiry)Lock_clear,
    .tp_methods = Lock_methods,
    .tp_members = Lock_members,
    .tp_getset = Lock_getset,
};

/* ---- Task ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *q;          /* the task table (a memoryview of int64) */
    Py_ssize_t ebase[MAX_CLASSES];
    int nclass;
    PyObject *uaf;        /* Task.uaf */
    PyObject *lockdep;    /* Task.lockdep */
    PyObject *sched;      /* Task.sched: a controlled run's scheduling point */
} TaskObject;

static int Task_traverse(TaskObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->q);
    Py_VISIT(self->uaf);
    Py_VISIT(self->lockdep);
    Py_VISIT(self->sched);
    return 0;
}

static int Task_clear(TaskObject *self)
{
    Py_CLEAR(self->q);
    Py_CLEAR(self->uaf);
    Py_CLEAR(self->lockdep);
    Py_CLEAR(self->sched);
    return 0;
}

static void Task_dealloc(TaskObject *self)
{
    PyObject_GC_UnTrack(self);
    Task_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _core_bind(q, ebase): the table and this task's entry offsets. */
static PyObject *Task_bind(TaskObject *self, PyObject *args)
{
    PyObject *q, *ebase;
    if (!PyArg_ParseTuple(args, "OO", &q, &ebase))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(q, &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND) < 0)
        return NULL;
    int ok = view.itemsize == 8 && view.format != NULL && strcmp(view.format, "q") == 0;
    PyBuffer_Release(&view);
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "the task table must be a writable buffer of int64 ('q')");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(ebase, "ebase must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_CLASSES) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many lock classes");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        self->ebase[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (self->ebase[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    self->nclass = (int)n;
    Py_INCREF(q);
    Py_XSETREF(self->q, q);
    Py_RETURN_NONE;
}

/* The task table's words, for the length of one operation.  The buffer
 * is taken and given back at each operation (not held): holding an export
 * would keep Cluster.close from releasing the mapping. */
typedef struct {
    Py_buffer view;
    int64_t *w;
    Py_ssize_t n;
} Words;

static int words_get(TaskObject *t, Words *ws)
{
    if (E_LOCK < 0 || E_WORD < 0 || M_ID < 0 || M_STATE < 0) {
        PyErr_SetString(PyExc_RuntimeError, "_lockcore.layout() was not called (uksm.kernel.locks calls it)");
        return -1;
    }
    if (t->q == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "task not bound to a table (_core_bind)");
        return -1;
    }
    if (PyObject_GetBuffer(t->q, &ws->view, PyBUF_WRITABLE) < 0)
        return -1;
    ws->w = (int64_t *)ws->view.buf;
    ws->n = ws->view.len / 8;
    return 0;
}

static inline int64_t ld(Words *ws, Py_ssize_t i)
{
    return __atomic_load_n(&ws->w[i], __ATOMIC_ACQUIRE);
}

static inline void st(Words *ws, Py_ssize_t i, int64_t v)
{
    __atomic_store_n(&ws->w[i], v, __ATOMIC_RELEASE);
}

/* The WAITING/RELEASING store is visible before the semaphore operation
 * that follows it (see the top comment). */
static inline void order_before_sem(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* the compiler only */
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* The lock's entry offset in this task's row, bounds-checked. */
static Py_ssize_t entry_of(TaskObject *t, LockObject *lk, Words *ws)
{
    if (lk->cls >= t->nclass) {
        PyErr_Format(PyExc_IndexError, "lock class %lld beyond the task's entries", lk->cls);
        return -1;
    }
    Py_ssize_t e = t->ebase[lk->cls];
    if (e < 0 || e + E_WORD >= ws->n || e + E_LOCK >= ws->n || e + E_WORD < 0 || e + E_LOCK < 0) {
        PyErr_SetString(PyExc_IndexError, "lock entry outside the task table");
        return -1;
    }
    return e;
}

/* q[i] as Python reads it: a negative index counts from the end. */
static int py_load(Words *ws, Py_ssize_t i, int64_t *out)
{
    if (i < 0)
        i += ws->n;
    if (i < 0 || i >= ws->n) {
        PyErr_SetString(PyExc_IndexError, "index out of bounds on the task table");
        return -1;
    }
    *out = ld(ws, i);
    return 0;
}

/* mm_freed (locks.py): the mm whose lock this is has been freed.
 * 1 freed, 0 not, -1 error. */
static int mm_freed(LockObject *lk, Words *ws)
{
    Py_ssize_t b = (Py_ssize_t)lk->mmbase;
    int64_t id, state;
    if (py_load(ws, b + M_ID, &id) < 0)
        return -1;
    if (id != lk->mm)
        return 1;      /* the row holds another mm (M_STATE not read: as the reference) */
    if (py_load(ws, b + M_STATE, &state) < 0)
        return -1;
    return state == MMS_FREEING || state == MMS_FREE;
}

/* A hook's or method's result, dropped: 0, or -1 when it raised. */
static int discard(PyObject *r)
{
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The hooks, before the operation: uaf(lk, op) when the mm is freed. */
static int call_uaf(TaskObject *t, LockObject *lk, PyObject *op)
{
    if (t->uaf == NULL || t->uaf == Py_None || lk->mmrow < 0)
        return 0;
    Words ws;
    if (words_get(t, &ws) < 0)
        return -1;
    int freed = mm_freed(lk, &ws);
    PyBuffer_Release(&ws.view);
    if (freed <= 0)
        return freed;
    return discard(PyObject_CallFunctionObjArgs(t->uaf, (PyObject *)lk, op, NULL));
}

/* The scheduling point of a controlled run: sched(op, lk); 0, or -1 when
 * it raised.  Not set (a normal run): nothing, one pointer test. */
static int call_sched(TaskObject *t, PyObject *op, PyObject *lk)
{
    if (t->sched == NULL || t->sched == Py_None)
        return 0;
    return discard(PyObject_CallFunctionObjArgs(t->sched, op, lk, NULL));
}

/* One unit without blocking: 1 taken, 0 busy, -1 error (exception set). */
static int sem_try(LockObject *lk)
{
    if (lk->psem != NULL) {
        if (sem_trywait(lk->psem) == 0)
            return 1;
        if (errno == EAGAIN)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (discard(PyObject_CallMethodOneArg(lk->sem, s_acquire, s_zero)) == 0)
        return 1;
    if (PyErr_ExceptionMatches(BusyError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

static int sem_give(LockObject *lk)
{
    if (lk->psem != NULL) {
        if (sem_post(lk->psem) == 0)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return discard(PyObject_CallMethodNoArgs(lk->sem, s_release));
}

static int check_lock(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &LockType)) {
        PyErr_Format(PyExc_TypeError, "expected a Lock, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

/* The first half of lock and trylock: E_LOCK, the word -> WAITING, one
 * sem_trywait [window A].  Returns 1 taken, 0 busy (the buffer held, *e and
 * *w set for the second half), -1 error (the buffer given back). */
static int take_try(TaskObject *t, LockObject *lk, Words *ws, Py_ssize_t *e, int64_t *w,
                    int64_t *prev)
{
    if (words_get(t, ws) < 0)
        return -1;
    *e = entry_of(t, lk, ws);
    if (*e < 0)
        goto fail;
    *prev = ld(ws, *e + E_LOCK);
    st(ws, *e + E_LOCK, lk->lid);
    *w = ld(ws, *e + E_WORD);
    st(ws, *e + E_WORD, (*w & ~7LL) + 8 + WAITING);
    order_before_sem();
    int got = sem_try(lk);
    if (got >= 0)
        return got;
fail:
    PyBuffer_Release(&ws->view);
    return -1;
}

/* lock(lk, check=True): Task.lock of locks.py */
static PyObject *Task_lock(TaskObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    /* lock(lk, check=True), either by position or by keyword */
    PyObject *o = nargs > 0 ? args[0] : NULL, *chk = nargs > 1 ? args[1] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int bad = nargs > 2;
    for (Py_ssize_t i = 0; i < nkw && !bad; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), **slot = NULL;
        if (PyUnicode_Compare(k, s_lk) == 0)
            slot = &o;
        else if (PyUnicode_Compare(k, s_check) == 0)
            slot = &chk;
        bad = slot == NULL || *slot != NULL;
        if (!bad)
            *slot = args[nargs + i];
    }
    if (bad || o == NULL) {
        PyErr_SetString(PyExc_TypeError, "lock() takes a lock and an optional check: lock(lk, check=True)");
        return NULL;
    }
    if (check_lock(o) < 0)
        return NULL;
    LockObject *lk = (LockObject *)o;
    if (call_sched(self, s_lock, o) < 0)
        return NULL;
    if (call_uaf(self, lk, s_lock) < 0)
        return NULL;
    int check = chk == NULL ? 1 : PyObject_IsTrue(chk);
    if (check < 0)
        return NULL;
    if (check && self->lockdep != NULL && self->lockdep != Py_None) {
        if (discard(PyObject_CallMethodObjArgs((PyObject *)self, s_lockdep_check, o, s_lock, NULL)) < 0)
            return NULL;
    }
    Words ws;
    Py_ssize_t e;
    int64_t w;
    int64_t prev;
    int got = take_try(self, lk, &ws, &e, &w, &prev);
    if (got < 0)
        return NULL;
    if (!got) {
        /* contended: Task._block waits (slices, E_SPINS, the abort hook);
         * the buffer is given back meanwhile */
        PyBuffer_Release(&ws.view);
        PyObject *el = PyLong_FromSsize_t(e);
        if (el == NULL)
            return NULL;
        int err = discard(PyObject_CallMethodObjArgs((PyObject *)self, s_block, o, el, NULL));
        Py_DECREF(el);
        if (err < 0)
            return NULL;
        if (words_get(self, &ws) < 0)
            return NULL;
    }
    st(&ws, e + E_WORD, (w & ~7LL) + 16 + HELD);
    PyBuffer_Release(&ws.view);
    Py_RETURN_NONE;
}

/* trylock(lk): Task.trylock of locks.py */
static PyObject *Task_trylock(TaskObject *self, PyObject *o)
{
    if (check_lock(o) < 0)
        return NULL;
    LockObject *lk = (LockObject *)o;
    if (call_sched(self, s_trylock, o) < 0)
        return NULL;
    if (call_uaf(self, lk, s_trylock) < 0)
        return NULL;
    if (self->lockdep != NULL && self->lockdep != Py_None) {
        PyObject *h = PyObject_CallMethodOneArg((PyObject *)self, s_holds, o);
        if (h == NULL)
            return NULL;
        int held = PyObject_IsTrue(h);
        Py_DECREF(h);
        if (held < 0)
            return NULL;
        if (held) {
            PyObject *lid = PyLong_FromLongLong(lk->lid);
            if (lid == NULL)
                return NULL;
            int err = discard(PyObject_CallFunctionObjArgs(self->lockdep, s_recursive, o, lid, s_trylock, NULL));
            Py_DECREF(lid);
            if (err < 0)
                return NULL;
        }
    }
    Words ws;
    Py_ssize_t e;
    int64_t w;
    int64_t prev;
    int got = take_try(self, lk, &ws, &e, &w, &prev);
    if (got < 0)
        return NULL;
    if (got) {
        st(&ws, e + E_WORD, (w & ~7LL) + 16 + HELD);
    } else {
        /* busy: the entry back as it was (lock and state).  A holder's
         * trylock of what it holds (lockdep's "recursive") left it IDLE,
         * and recover() then counted the unit it still held as a dead
         * task's (test_lockcore's random SIGKILLs, 1 run in ~50). */
        st(&ws, e + E_LOCK, prev);
        st(&ws, e + E_WORD, (w & ~7LL) + 16 + (w & 7));
    }
    PyBuffer_Release(&ws.view);
    return PyBool_FromLong(got);
}

/* unlock(lk): Task.unlock of locks.py */
static PyObject *Task_unlock(TaskObject *self, PyObject *o)
{
    if (check_lock(o) < 0)
        return NULL;
    LockObject *lk = (LockObject *)o;
    if (call_sched(self, s_unlock, o) < 0)
        return NULL;
    if (call_uaf(self, lk, s_unlock) < 0)
        return NULL;
    Words ws;
    if (words_get(self, &ws) < 0)
        return NULL;
    Py_ssize_t e = entry_of(self, lk, &ws);
    if (e < 0)
        goto fail;
    int64_t w = ld(&ws, e + E_WORD);
    st(&ws, e + E_WORD, (w & ~7LL) + 8 + RELEASING);
    order_before_sem();
    if (sem_give(lk) < 0)
        goto fail;
    st(&ws, e + E_WORD, (w & ~7LL) + 16 + IDLE);
    PyBuffer_Release(&ws.view);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&ws.view);
    return NULL;
}

static PyMethodDef Task_methods[] = {
    {"_core_bind", (PyCFunction)Task_bind, METH_VARARGS, "bind the C path to the task table"},
    {"lock", (PyCFunction)(void (*)(void))Task_lock, METH_FASTCALL | METH_KEYWORDS,
     "mutex_lock / down_read: take one unit (locks.Task.lock)"},
    {"trylock", (PyCFunction)Task_trylock, METH_O,
     "mutex_trylock / down_read_trylock (locks.Task.trylock)"},
    {"unlock", (PyCFunction)Task_unlock, METH_O, "mutex_unlock / up_read (locks.Task.unlock)"},
    {NULL}
};

static PyMemberDef Task_members[] = {
    {"uaf", T_OBJECT, offsetof(TaskObject, uaf), 0, "the use-after-free hook"},
    {"lockdep", T_OBJECT, offsetof(TaskObject, lockdep), 0, "the lock-order hook"},
    {"sched", T_OBJECT, offsetof(TaskObject, sched), 0, "a controlled run's scheduling point"},
    {NULL}
};

static PyTypeObject TaskType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "uksm.kernel._lockcore.TaskCore",
    .tp_basicsize = sizeof(TaskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Task.lock, trylock and unlock in C (see locks.py).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Task_dealloc,
    .tp_traverse = (traverseproc)Task_traverse,
    .tp_clear = (inquiry)Task_clear,
    .tp_methods = Task_methods,
    .tp_members = Task_members,
};

/* layout(E_LOCK, E_WORD, M_ID, M_STATE, MMS_FREEING, MMS_FREE) */
static PyObject *set_layout(PyObject *mod, PyObject *args)
{
    long long el, ew, mi, ms, mf, mfr;
    if (!PyArg_ParseTuple(args, "LLLLLL", &el, &ew, &mi, &ms, &mf, &mfr))
        return NULL;
    E_LOCK = el; E_WORD = ew; M_ID = mi; M_STATE = ms; MMS_FREEING = mf; MMS_FREE = mfr;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"layout", set_layout, METH_VARARGS, "the layout's offsets: E_LOCK, E_WORD, M_ID, M_STATE, MMS_FREEING, MMS_FREE"},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "uksm.kernel._lockcore",
    "The uncontended lock protocol of uksm.kernel.locks, in C.", -1, module_methods,
};

#define INTERN(var, s) if ((var = PyUnicode_InternFromString(s)) == NULL) return NULL

PyMODINIT_FUNC PyInit__lockcore(void)
{
    PyObject *posix_ipc = PyImport_ImportModule("posix_ipc");
    if (posix_ipc == NULL)
        return NULL;
    SemaphoreType = PyObject_GetAttrString(posix_ipc, "Semaphore");
    BusyError = PyObject_GetAttrString(posix_ipc, "BusyError");
    Py_DECREF(posix_ipc);
    if (SemaphoreType == NULL || BusyError == NULL)
        return NULL;
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_block, "_block");
    INTERN(s_lockdep_check, "lockdep_check");
    INTERN(s_holds, "holds");
    INTERN(s_recursive, "recursive");
    INTERN(s_lock, "lock");
    INTERN(s_trylock, "trylock");
    INTERN(s_unlock, "unlock");
    INTERN(s_check, "check");
    INTERN(s_lk, "lk");
    INTERN(s_close, "close");
    if ((s_zero = PyLong_FromLong(0)) == NULL)
        return NULL;
    if (PyType_Ready(&LockType) < 0 || PyType_Ready(&TaskType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
#ifndef LOCKCORE_SOURCE
#define LOCKCORE_SOURCE ""
#endif
    if (PyModule_AddStringConstant(m, "source", LOCKCORE_SOURCE) < 0 ||
        PyModule_AddObjectRef(m, "LockCore", (PyObject *)&LockType) < 0 ||
        PyModule_AddObjectRef(m, "TaskCore", (PyObject *)&TaskType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
