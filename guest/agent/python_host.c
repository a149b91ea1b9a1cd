/* The embedded interpreter and the request path.
 *
 * Exec semantics live in kvmfork_runner.py; this file moves bytes between the
 * mailbox and runner.run() and enforces the contract's bounds. Everything
 * reachable from kvmfork_handle_request runs in a fork: no syscalls there.
 */
#include <Python.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "agent.h"

#define RUNNER_DIR "/usr/lib/kvmfork"
#define RUNNER_MODULE "kvmfork_runner"
#define WARMUP_SEQ_BASE 0x7761726d00000000ULL /* "warm": never a host seq */

static PyObject *runner_module;
static PyObject *runner_run;

#define REQ_FLAGS_KNOWN (KVMFORK_REQ_FLAG_SESSION | KVMFORK_REQ_FLAG_RESEED)

static void check_status(PyStatus status, const char *what)
{
    if (PyStatus_Exception(status))
        kvmfork_fatal("%s: %s%s%s", what, status.func ? status.func : "",
                    status.func ? ": " : "", status.err_msg ? status.err_msg : "failed");
}

/* Formats the pending Python exception as "Type: message" into buf. */
static void describe_python_error(char *buf, size_t len)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    const char *type_name = type ? ((PyTypeObject *)type)->tp_name : "unknown error";
    const char *text = "";
    PyObject *str = value ? PyObject_Str(value) : NULL;
    if (str != NULL)
        text = PyUnicode_AsUTF8(str);
    if (text == NULL) {
        PyErr_Clear();
        text = "";
    }
    snprintf(buf, len, "%s: %s", type_name, text);
    Py_XDECREF(str);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

__attribute__((noreturn)) static void fatal_python(const char *what)
{
    char detail[2048];
    describe_python_error(detail, sizeof detail);
    kvmfork_fatal("%s: %s", what, detail);
}

/* CPython reports a SyntaxError by first trying to read the offending line
 * from the file named in the code object, so every syntax error in a
 * request would attempt open("<string>"): a failing syscall on the hot path
 * (~3 ms on PVM). Refusing that one pseudo-file in an audit hook makes
 * CPython fall back to the source it already has, with identical output. */
static int refuse_pseudo_file_open(const char *event, PyObject *args, void *data)
{
    (void)data;
    if (strcmp(event, "open") != 0 || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) < 1)
        return 0;
    PyObject *path = PyTuple_GET_ITEM(args, 0);
    if (PyUnicode_Check(path) && PyUnicode_CompareWithASCIIString(path, "<string>") == 0) {
        PyErr_SetString(PyExc_FileNotFoundError, "<string> is the request's code, not a file");
        return -1;
    }
    return 0;
}

static void configure_interpreter(void)
{
    if (PySys_AddAuditHook(refuse_pseudo_file_open, NULL) != 0)
        kvmfork_fatal("PySys_AddAuditHook failed");

    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1;
    check_status(Py_PreInitialize(&preconfig), "Python pre-initialisation");

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    /* Like `python -c`: site (exit(), dist-packages), no user site, no
     * bytecode writes (the rootfs ships precompiled .pyc files). */
    config.site_import = 1;
    config.user_site_directory = 0;
    config.write_bytecode = 0;
    config.parse_argv = 0;
    config.install_signal_handlers = 1;
    wchar_t *argv[] = {L"-c"};
    check_status(PyConfig_SetArgv(&config, 1, argv), "PyConfig argv");
    check_status(PyConfig_SetString(&config, &config.home, L"/usr"), "PyConfig home");
    check_status(PyConfig_SetString(&config, &config.program_name, L"/usr/bin/python3.11"),
                 "PyConfig program_name");
    check_status(PyConfig_SetString(&config, &config.executable, L"/usr/bin/python3.11"),
                 "PyConfig executable");
    check_status(PyConfig_SetString(&config, &config.stdio_encoding, L"utf-8"),
                 "PyConfig stdio_encoding");
    check_status(PyConfig_SetString(&config, &config.stdio_errors, L"backslashreplace"),
                 "PyConfig stdio_errors");
    /* The rootfs keeps the pure-Python stdlib in the (deflated) zip. */
    config.module_search_paths_set = 1;
    check_status(PyWideStringList_Append(&config.module_search_paths, L"/usr/lib/python311.zip"),
                 "PyConfig module_search_paths");
    check_status(
        PyWideStringList_Append(&config.module_search_paths, L"/usr/lib/python3.11/lib-dynload"),
        "PyConfig module_search_paths");
    check_status(Py_InitializeFromConfig(&config), "Python initialisation");
    PyConfig_Clear(&config);
}

/* kvmfork_runner.set_interruptible(enabled): the runner opens the gate for
 * the host's interrupt right before user code and closes it right after. */
static PyObject *set_interruptible(PyObject *self, PyObject *enabled)
{
    (void)self;
    int on = PyObject_IsTrue(enabled);
    if (on < 0)
        return NULL;
    kvmfork_interrupt_set_armed(on != 0);
    Py_RETURN_NONE;
}

static PyMethodDef set_interruptible_def = {
    "set_interruptible", set_interruptible, METH_O,
    "Open (True) or close (False) the gate for the host's interrupt.",
};

static void check_runner_constant(const char *name, long expected)
{
    PyObject *value = PyObject_GetAttrString(runner_module, name);
    if (value == NULL)
        fatal_python(name);
    long got = PyLong_AsLong(value);
    Py_DECREF(value);
    if (got != expected)
        kvmfork_fatal(RUNNER_MODULE ".%s is %ld, contract.h says %ld", name, got, expected);
}

/* The host's interrupt becomes KeyboardInterrupt only if SIGINT has
 * Python's default handler (PyErr_SetInterruptEx ignores SIG_DFL/SIG_IGN).
 * config.install_signal_handlers installs it; make sure, once, at boot. */
static void ensure_sigint_handler(void)
{
    PyObject *signal_module = PyImport_ImportModule("signal");
    if (signal_module == NULL)
        fatal_python("import signal");
    PyObject *handler = PyObject_GetAttrString(signal_module, "default_int_handler");
    PyObject *current = PyObject_CallMethod(signal_module, "getsignal", "i", SIGINT);
    if (handler == NULL || current == NULL)
        fatal_python("signal.getsignal(SIGINT)");
    if (current != handler) {
        PyObject *previous = PyObject_CallMethod(signal_module, "signal", "iO", SIGINT, handler);
        if (previous == NULL)
            fatal_python("signal.signal(SIGINT, signal.default_int_handler)");
        Py_DECREF(previous);
        kvmfork_log("installed signal.default_int_handler for SIGINT");
    }
    Py_DECREF(current);
    Py_DECREF(handler);
    Py_DECREF(signal_module);
}

static void load_runner(void)
{
    /* Import from its own directory without leaving it on sys.path. */
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    PyObject *dir = PyUnicode_FromString(RUNNER_DIR);
    if (path == NULL || dir == NULL || PyList_Insert(path, 0, dir) != 0)
        fatal_python("sys.path");
    runner_module = PyImport_ImportModule(RUNNER_MODULE);
    Py_ssize_t index = PySequence_Index(path, dir);
    if (index >= 0)
        PySequence_DelItem(path, index);
    Py_DECREF(dir);
    if (runner_module == NULL)
        fatal_python("import " RUNNER_DIR "/" RUNNER_MODULE ".py");
    runner_run = PyObject_GetAttrString(runner_module, "run");
    if (runner_run == NULL)
        fatal_python(RUNNER_MODULE ".run");
    check_runner_constant("REQ_FLAG_SESSION", KVMFORK_REQ_FLAG_SESSION);
    check_runner_constant("REQ_FLAG_RESEED", KVMFORK_REQ_FLAG_RESEED);
    check_runner_constant("REQ_FLAGS_KNOWN", REQ_FLAGS_KNOWN);
    PyObject *gate = PyCFunction_New(&set_interruptible_def, NULL);
    if (gate == NULL || PyObject_SetAttrString(runner_module, "set_interruptible", gate) != 0)
        fatal_python(RUNNER_MODULE ".set_interruptible");
    Py_DECREF(gate);
    ensure_sigint_handler();
}

static void import_template_modules(void)
{
    PyObject *names = PyObject_GetAttrString(runner_module, "TEMPLATE_MODULES");
    if (names == NULL || !PyTuple_Check(names))
        fatal_python(RUNNER_MODULE ".TEMPLATE_MODULES");
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(names, i));
        if (name == NULL)
            fatal_python("TEMPLATE_MODULES entry");
        double started = kvmfork_uptime_seconds();
        PyObject *module = PyImport_ImportModule(name);
        if (module == NULL) {
            char what[256];
            snprintf(what, sizeof what, "import %s", name);
            fatal_python(what);
        }
        Py_DECREF(module);
        double took = kvmfork_uptime_seconds() - started;
        if (took >= 1.0)
            kvmfork_log("import %s: %.1f s", name, took);
    }
    Py_DECREF(names);
}

void kvmfork_python_start(void)
{
    double started = kvmfork_uptime_seconds();
    configure_interpreter();
    kvmfork_log("python initialised in %.1f s", kvmfork_uptime_seconds() - started);
    started = kvmfork_uptime_seconds();
    load_runner();
    import_template_modules();
    kvmfork_log("runner and template modules imported in %.1f s", kvmfork_uptime_seconds() - started);
}

void kvmfork_put_request(struct kvmfork_mailbox *mb, uint64_t seq, uint32_t language,
                       uint32_t flags, const char *code, size_t code_len,
                       uint32_t stdout_cap, uint32_t stderr_cap)
{
    size_t copied = code_len < KVMFORK_MB_CODE_MAX ? code_len : KVMFORK_MB_CODE_MAX;
    memcpy(mb->base + KVMFORK_MB_CODE_OFF, code, copied);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_LANGUAGE_OFF, language);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_FLAGS_OFF, flags);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_TIMEOUT_MS_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_CODE_LEN_OFF, (uint32_t)code_len);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_STDOUT_CAP_OFF, stdout_cap);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_STDERR_CAP_OFF, stderr_cap);
    kvmfork_mb_write64(mb, KVMFORK_MB_REQ_SEQ_OFF, seq);
}

/* ---- the hot path ---- */

struct response {
    uint32_t status;
    int32_t exit_code;
    uint32_t stdout_len;
    uint32_t stderr_len;
    uint32_t result_len;
    uint32_t flags;
    uint64_t exec_ns;
};

static uint32_t min_u32(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

/* Copies at most cap bytes, cutting on a UTF-8 character boundary so the
 * host can decode a truncated stream cleanly. Returns the bytes written. */
static uint32_t copy_capped(uint8_t *dst, uint32_t cap, const char *src, size_t len,
                            bool *truncated)
{
    *truncated = len > cap;
    size_t n = len;
    if (*truncated) {
        n = cap;
        /* src[n] is the first byte left out; back off while it continues a
         * character that started inside the copied part (at most 3 bytes). */
        for (int i = 0; i < 3 && n > 0 && ((uint8_t)src[n] & 0xC0) == 0x80; i++)
            n--;
        if (((uint8_t)src[n] & 0xC0) == 0x80)
            n = cap; /* not UTF-8 after all: cut at the cap */
    }
    memcpy(dst, src, n);
    return (uint32_t)n;
}

static void write_message(struct kvmfork_mailbox *mb, struct response *resp, uint32_t stderr_cap,
                          const char *message)
{
    bool truncated;
    resp->stderr_len = copy_capped(mb->base + KVMFORK_MB_STDERR_OFF, stderr_cap, message,
                                   strlen(message), &truncated);
    if (truncated)
        resp->flags |= KVMFORK_RESP_FLAG_STDERR_TRUNCATED;
}

static bool is_runner_result(PyObject *result)
{
    if (result == NULL || !PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 4)
        return false;
    PyObject *text = PyTuple_GET_ITEM(result, 3);
    return PyBytes_Check(PyTuple_GET_ITEM(result, 0)) &&
           PyBytes_Check(PyTuple_GET_ITEM(result, 1)) &&
           PyLong_Check(PyTuple_GET_ITEM(result, 2)) && (text == Py_None || PyUnicode_Check(text));
}

static void run_python(struct kvmfork_mailbox *mb, uint32_t flags, uint32_t code_len,
                       uint32_t stdout_cap, uint32_t stderr_cap, struct response *resp)
{
    PyObject *code = PyBytes_FromStringAndSize((const char *)mb->base + KVMFORK_MB_CODE_OFF,
                                               code_len);
    PyObject *seed = PyBytes_FromStringAndSize((const char *)mb->base + KVMFORK_MB_FORK_SEED_OFF,
                                               KVMFORK_MB_SEED_LEN);
    PyObject *flags_obj = PyLong_FromUnsignedLong(flags);
    PyObject *result = NULL;
    uint64_t started = kvmfork_rdtsc();
    if (code != NULL && seed != NULL && flags_obj != NULL)
        result = PyObject_CallFunctionObjArgs(runner_run, code, seed, flags_obj, NULL);
    resp->exec_ns = kvmfork_tsc_to_ns(kvmfork_rdtsc() - started);
    Py_XDECREF(code);
    Py_XDECREF(seed);
    Py_XDECREF(flags_obj);
    /* Whatever happened in the runner, no interrupt outlives the request. */
    kvmfork_interrupt_set_armed(false);

    /* The result's text as UTF-8; a str from a user's __repr__ may hold
     * lone surrogates, which become \udcxx escapes. */
    PyObject *result_bytes = NULL;
    if (is_runner_result(result) && PyTuple_GET_ITEM(result, 3) != Py_None)
        result_bytes = PyUnicode_AsEncodedString(PyTuple_GET_ITEM(result, 3), "utf-8",
                                                 "backslashreplace");

    if (!is_runner_result(result) ||
        (PyTuple_GET_ITEM(result, 3) != Py_None && result_bytes == NULL)) {
        char message[1024] = "kvmfork agent: runner returned a malformed result";
        if (PyErr_Occurred()) {
            char detail[960];
            describe_python_error(detail, sizeof detail);
            snprintf(message, sizeof message, "kvmfork agent: runner failed: %s", detail);
        }
        Py_XDECREF(result);
        resp->status = KVMFORK_STATUS_AGENT_ERROR;
        write_message(mb, resp, stderr_cap, message);
        return;
    }

    PyObject *out = PyTuple_GET_ITEM(result, 0);
    PyObject *err = PyTuple_GET_ITEM(result, 1);
    bool truncated;
    resp->stdout_len = copy_capped(mb->base + KVMFORK_MB_STDOUT_OFF, stdout_cap,
                                   PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out),
                                   &truncated);
    if (truncated)
        resp->flags |= KVMFORK_RESP_FLAG_STDOUT_TRUNCATED;
    resp->stderr_len = copy_capped(mb->base + KVMFORK_MB_STDERR_OFF, stderr_cap,
                                   PyBytes_AS_STRING(err), (size_t)PyBytes_GET_SIZE(err),
                                   &truncated);
    if (truncated)
        resp->flags |= KVMFORK_RESP_FLAG_STDERR_TRUNCATED;
    if (result_bytes != NULL) {
        resp->result_len = copy_capped(mb->base + KVMFORK_MB_RESULT_OFF, KVMFORK_MB_RESULT_MAX,
                                       PyBytes_AS_STRING(result_bytes),
                                       (size_t)PyBytes_GET_SIZE(result_bytes), &truncated);
        resp->flags |= KVMFORK_RESP_FLAG_HAS_RESULT;
        if (truncated)
            resp->flags |= KVMFORK_RESP_FLAG_RESULT_TRUNCATED;
        Py_DECREF(result_bytes);
    }
    resp->exit_code = (int32_t)PyLong_AsLong(PyTuple_GET_ITEM(result, 2));
    resp->status = KVMFORK_STATUS_OK;
    Py_DECREF(result);
}

void kvmfork_handle_request(struct kvmfork_mailbox *mb)
{
    kvmfork_mb_write32(mb, KVMFORK_MB_AGENT_STATE_OFF, KVMFORK_STATE_RUNNING);
    kvmfork_interrupt_begin_request();
    uint64_t seq = kvmfork_mb_read64(mb, KVMFORK_MB_REQ_SEQ_OFF);
    uint32_t language = kvmfork_mb_read32(mb, KVMFORK_MB_REQ_LANGUAGE_OFF);
    uint32_t flags = kvmfork_mb_read32(mb, KVMFORK_MB_REQ_FLAGS_OFF);
    uint32_t code_len = kvmfork_mb_read32(mb, KVMFORK_MB_REQ_CODE_LEN_OFF);
    uint32_t stdout_cap = min_u32(kvmfork_mb_read32(mb, KVMFORK_MB_REQ_STDOUT_CAP_OFF),
                                  KVMFORK_MB_STDOUT_MAX);
    uint32_t stderr_cap = min_u32(kvmfork_mb_read32(mb, KVMFORK_MB_REQ_STDERR_CAP_OFF),
                                  KVMFORK_MB_STDERR_MAX);
    struct response resp = {0};

    if (language != KVMFORK_LANG_PYTHON) {
        char message[128];
        snprintf(message, sizeof message,
                 "kvmfork agent: unsupported language %u (this template runs python)\n",
                 language);
        resp.status = KVMFORK_STATUS_BAD_REQUEST;
        write_message(mb, &resp, stderr_cap, message);
    } else if (code_len > KVMFORK_MB_CODE_MAX) {
        char message[128];
        snprintf(message, sizeof message,
                 "kvmfork agent: code is %u bytes, the limit is %u\n", code_len,
                 (unsigned)KVMFORK_MB_CODE_MAX);
        resp.status = KVMFORK_STATUS_BAD_REQUEST;
        write_message(mb, &resp, stderr_cap, message);
    } else if ((flags & ~(uint32_t)REQ_FLAGS_KNOWN) != 0) {
        char message[128];
        snprintf(message, sizeof message,
                 "kvmfork agent: unknown request flags %#x (this agent knows %#x)\n", flags,
                 (unsigned)REQ_FLAGS_KNOWN);
        resp.status = KVMFORK_STATUS_BAD_REQUEST;
        write_message(mb, &resp, stderr_cap, message);
    } else {
        run_python(mb, flags, code_len, stdout_cap, stderr_cap, &resp);
        if (kvmfork_interrupt_requested())
            resp.flags |= KVMFORK_RESP_FLAG_INTERRUPTED;
    }

    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STATUS_OFF, resp.status);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_EXIT_CODE_OFF, (uint32_t)resp.exit_code);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF, resp.stdout_len);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDERR_LEN_OFF, resp.stderr_len);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_RESULT_LEN_OFF, resp.result_len);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_FLAGS_OFF, resp.flags);
    kvmfork_mb_write64(mb, KVMFORK_MB_RESP_EXEC_NS_OFF, resp.exec_ns);
    /* Last, so a response with the right seq is always complete. */
    kvmfork_mb_write64(mb, KVMFORK_MB_RESP_SEQ_OFF, seq);
    kvmfork_mb_write32(mb, KVMFORK_MB_AGENT_STATE_OFF, KVMFORK_STATE_DONE);
}

/* ---- warm-up ---- */

static const char *utf8_of(PyObject *tuple, Py_ssize_t index, Py_ssize_t *len)
{
    const char *text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(tuple, index), len);
    if (text == NULL)
        fatal_python(RUNNER_MODULE ".WARMUP entry");
    return text;
}

/* A short, printable excerpt of mailbox bytes for error messages. */
static void excerpt(char *dst, size_t dst_len, const uint8_t *src, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 5 < dst_len; i++) {
        uint8_t c = src[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            dst[o++] = (char)c;
        else
            o += (size_t)snprintf(dst + o, dst_len - o, "\\x%02x", c);
    }
    dst[o < dst_len ? o : dst_len - 1] = '\0';
}

struct warmup_expectation {
    const char *stdout_text;
    Py_ssize_t stdout_len;
    long exit_code;
    const char *result; /* NULL: no result */
    Py_ssize_t result_len;
};

static void check_warmup_result(struct kvmfork_mailbox *mb, Py_ssize_t index, const char *code,
                                const struct warmup_expectation *want)
{
    uint32_t status = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STATUS_OFF);
    int32_t exit_code = (int32_t)kvmfork_mb_read32(mb, KVMFORK_MB_RESP_EXIT_CODE_OFF);
    uint32_t out_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF);
    uint32_t err_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDERR_LEN_OFF);
    uint32_t result_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_RESULT_LEN_OFF);
    uint32_t flags = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_FLAGS_OFF);
    size_t want_len = (size_t)want->stdout_len < KVMFORK_MB_STDOUT_MAX ? (size_t)want->stdout_len
                                                                       : KVMFORK_MB_STDOUT_MAX;
    bool want_truncated = (size_t)want->stdout_len > KVMFORK_MB_STDOUT_MAX;
    bool out_ok = out_len == want_len &&
                  memcmp(mb->base + KVMFORK_MB_STDOUT_OFF, want->stdout_text, want_len) == 0 &&
                  ((flags & KVMFORK_RESP_FLAG_STDOUT_TRUNCATED) != 0) == want_truncated;
    bool result_ok =
        want->result == NULL
            ? result_len == 0 && (flags & (KVMFORK_RESP_FLAG_HAS_RESULT |
                                           KVMFORK_RESP_FLAG_RESULT_TRUNCATED)) == 0
            : (flags & (KVMFORK_RESP_FLAG_HAS_RESULT | KVMFORK_RESP_FLAG_RESULT_TRUNCATED)) ==
                      KVMFORK_RESP_FLAG_HAS_RESULT &&
                  result_len == (size_t)want->result_len &&
                  memcmp(mb->base + KVMFORK_MB_RESULT_OFF, want->result, result_len) == 0;
    if (status == KVMFORK_STATUS_OK && exit_code == want->exit_code && out_ok && result_ok &&
        (flags & KVMFORK_RESP_FLAG_INTERRUPTED) == 0)
        return;
    char got_out[300], got_err[600], got_result[300];
    excerpt(got_out, sizeof got_out, mb->base + KVMFORK_MB_STDOUT_OFF, out_len < 200 ? out_len : 200);
    excerpt(got_err, sizeof got_err, mb->base + KVMFORK_MB_STDERR_OFF, err_len < 400 ? err_len : 400);
    excerpt(got_result, sizeof got_result, mb->base + KVMFORK_MB_RESULT_OFF,
            result_len < 200 ? result_len : 200);
    kvmfork_fatal("warm-up snippet %zd failed: %.200s\n  status %u exit %d (want %ld) flags %#x\n"
                "  stdout %u bytes: %s\n  result %u bytes: %s (want %.200s)\n  stderr: %s",
                index, code, status, exit_code, want->exit_code, flags, out_len, got_out,
                result_len, got_result, want->result ? want->result : "none", got_err);
}

void kvmfork_python_warm_up(struct kvmfork_mailbox *mb)
{
    double started = kvmfork_uptime_seconds();
    PyObject *snippets = PyObject_GetAttrString(runner_module, "WARMUP");
    if (snippets == NULL || !PyTuple_Check(snippets))
        fatal_python(RUNNER_MODULE ".WARMUP");
    Py_ssize_t count = PyTuple_GET_SIZE(snippets);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = PyTuple_GET_ITEM(snippets, i);
        if (!PyTuple_Check(entry) || (PyTuple_GET_SIZE(entry) != 3 && PyTuple_GET_SIZE(entry) != 5))
            kvmfork_fatal(RUNNER_MODULE ".WARMUP[%zd] is not (code, stdout, exit) or "
                                        "(code, stdout, exit, flags, result)", i);
        Py_ssize_t code_len;
        struct warmup_expectation want = {0};
        const char *code = utf8_of(entry, 0, &code_len);
        want.stdout_text = utf8_of(entry, 1, &want.stdout_len);
        want.exit_code = PyLong_AsLong(PyTuple_GET_ITEM(entry, 2));
        /* Stateless entries get what the host sends on a stateless run. */
        uint32_t flags = KVMFORK_REQ_FLAG_RESEED;
        if (PyTuple_GET_SIZE(entry) == 5) {
            flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(entry, 3));
            if (PyTuple_GET_ITEM(entry, 4) != Py_None)
                want.result = utf8_of(entry, 4, &want.result_len);
        }
        if (PyErr_Occurred())
            fatal_python(RUNNER_MODULE ".WARMUP entry");
        kvmfork_put_request(mb, WARMUP_SEQ_BASE + (uint64_t)i, KVMFORK_LANG_PYTHON, flags, code,
                          (size_t)code_len, KVMFORK_MB_STDOUT_MAX, KVMFORK_MB_STDERR_MAX);
        kvmfork_handle_request(mb);
        check_warmup_result(mb, i, code, &want);
    }
    Py_DECREF(snippets);
    kvmfork_log("warm-up: %zd snippets passed in %.1f s", count, kvmfork_uptime_seconds() - started);
}

void kvmfork_python_prepare_template(void)
{
    PyObject *result = PyObject_CallMethod(runner_module, "prepare_template", NULL);
    if (result == NULL)
        fatal_python(RUNNER_MODULE ".prepare_template");
    Py_DECREF(result);
}
