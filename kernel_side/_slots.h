/* Building instances of a slotted dataclass from C without running its __init__.
 *
 * A dataclass(slots=True) __init__ only assigns its arguments to the slots, but it is a Python
 * frame: on Python 3.11 about 0.2 us for a dozen fields, and the agent built three such records
 * per HTTP/1 span (request, response, span). slot_maker_init reads the slot offsets once;
 * slot_make allocates the instance and stores the references directly.
 *
 * slot_maker_init declines (returns 0, no exception) whenever that shortcut would not be the
 * same as calling the class: not a type, a __post_init__, a __slots__ that is not exactly
 * `nfields` plain object slots (a field added or removed since the C caller was written). The
 * caller then calls the class as before, so the shortcut can only ever be skipped, never wrong.
 */
#ifndef EBPF_BRIDGE_SLOTS_H
#define EBPF_BRIDGE_SLOTS_H

#include <Python.h>
#include <structmember.h>

#define SLOT_MAKER_MAX 16

typedef struct {
    PyTypeObject *type; /* NULL: call the class instead */
    int n;
    Py_ssize_t off[SLOT_MAKER_MAX];
} slot_maker;

/* 1: ready; 0: declined (the caller must call the class); -1: an exception is set. */
static int slot_maker_init(slot_maker *m, PyObject *cls, int nfields)
{
    m->type = NULL;
    m->n = 0;
    if (!PyType_Check(cls) || nfields > SLOT_MAKER_MAX)
        return 0;
    if (PyObject_HasAttrString(cls, "__post_init__"))
        return 0;
    PyObject *names = PyObject_GetAttrString(cls, "__slots__");
    if (names == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = PyTuple_Check(names) && PyTuple_GET_SIZE(names) == nfields;
    for (int i = 0; ok && i < nfields; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        /* Looked up on the class itself: a slot of this class, not one inherited. */
        PyObject *d = PyUnicode_Check(name)
                          ? PyDict_GetItemWithError(((PyTypeObject *)cls)->tp_dict, name)
                          : NULL;
        if (d == NULL && PyErr_Occurred()) {
            Py_DECREF(names);
            return -1;
        }
        ok = d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            m->off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    Py_DECREF(names);
    if (!ok)
        return 0;
    m->type = (PyTypeObject *)Py_NewRef(cls);
    m->n = nfields;
    return 1;
}

/* A new instance with args[0..n) (borrowed) in the slots, in __slots__ order; NULL on error.
 * Only for a maker slot_maker_init accepted. */
static PyObject *slot_make(const slot_maker *m, PyObject *const *args)
{
    PyObject *out = m->type->tp_alloc(m->type, 0);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < m->n; i++)
        *(PyObject **)((char *)out + m->off[i]) = Py_NewRef(args[i]);
    return out;
}

static void slot_maker_clear(slot_maker *m)
{
    Py_CLEAR(m->type);
    m->n = 0;
}

#endif
