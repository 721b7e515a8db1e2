/*
 * uffdio.h - the C core of uffdio.
 *
 * This header is also the cffi cdef: csrc/build_native.py feeds it to cffi
 * with the preprocessor lines removed, so it must stay plain C declarations
 * (fixed-size integer types, opaque structs, enums; no macros in the body).
 *
 * Conventions (as in the kernel selftests and liburing): one function per
 * kernel operation, no policy inside; every function returns 0 or a
 * non-negative count on success and -errno on failure.  Address ranges are
 * passed as flat uint64_t arrays of (start, length) pairs so that Python can
 * hand over many ranges in one call without building per-range objects.
 */
#ifndef UFFDIO_H
#define UFFDIO_H
#include <stdint.h>
#include <stddef.h>

/* ---- records handed to Python ------------------------------------------------
 * Exactly the kernel's 32-byte struct uffd_msg layout, plus synthetic events
 * (>= 0xF0) that the engine emits itself.  a/b/c are the three u64 words at
 * offsets 8, 16, 24 of the kernel message. */
struct uf_msg {
	uint8_t event;
	uint8_t reserved1;
	uint16_t reserved2;
	uint32_t reserved3;
	uint64_t a;
	uint64_t b;
	uint64_t c;
};

enum {
	UF_OPEN_USER_MODE_ONLY = 1, /* add UFFD_USER_MODE_ONLY */
	UF_OPEN_SYSCALL_ONLY = 2,   /* do not fall back to /dev/userfaultfd */
	UF_OPEN_DEVNODE_ONLY = 4,   /* only /dev/userfaultfd */
	UF_OPEN_BLOCKING = 8        /* omit O_NONBLOCK (tests of the EINTR pitfall) */
};

/* ---- userfaultfd: one function per ioctl ------------------------------------- */
int uf_open(int flags, int *via_devnode);
int uf_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);
int uf_probe(int flags, uint64_t *features_out, uint64_t *ioctls_out);
int uf_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int uf_unregister(int fd, uint64_t start, uint64_t len);
int uf_wake(int fd, uint64_t start, uint64_t len);
int uf_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *copied);
int uf_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *zeroed);
int uf_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped);
int uf_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *moved);
int uf_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *updated);
int uf_writeprotect(int fd, const uint64_t *ranges, size_t nranges, uint64_t mode, size_t *done);
int64_t uf_read_msgs(int fd, struct uf_msg *out, size_t max);
int uf_mm_alive(int fd); /* 1: its process's memory exists, 0: gone (exited, exec'd) */

/* Resolution helpers used by both Python and the engine.  They finish a
 * multi-page operation across partial progress and pages that are already
 * mapped (EEXIST: the page is resolved; the range is woken so no thread is
 * left waiting).  On -EAGAIN (events pending) *done says how far they got. */
int uf_copy_all(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, uint64_t *done);
int uf_zeropage_all(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done);

/* ---- other processes ----------------------------------------------------------- */
int64_t uf_process_vm_readv(int pid, const uint64_t *local, size_t nlocal, const uint64_t *remote, size_t nremote);
int64_t uf_process_vm_writev(int pid, const uint64_t *local, size_t nlocal, const uint64_t *remote, size_t nremote);
int64_t uf_process_madvise(int pidfd, const uint64_t *ranges, size_t nranges, int advice);
int uf_pidfd_open(int pid, unsigned int flags);
int uf_pidfd_getfd(int pidfd, int targetfd);
int uf_send_fd(int sock, int fd, const void *data, size_t len);
int uf_recv_fd(int sock, int *fd_out, void *data, size_t len);

struct uf_scan {
	uint64_t start, end, flags, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
	uint64_t walk_end; /* out */
};
/* regions_out: triples (start, end, categories); returns the number of regions */
int64_t uf_pagemap_scan(int pagemap_fd, struct uf_scan *scan, uint64_t *regions_out, size_t max_regions);

/* ---- the engine: io_uring ring + C resolver ------------------------------------ */
typedef struct uf_engine uf_engine;

enum {
	UF_ENGINE_NO_MULTISHOT = 1, /* use a re-armed IORING_OP_READ even if multishot works */
	UF_ENGINE_DEFAULT_ZERO = 2  /* a MISSING fault outside every rule gets a zero page in C
				     * (managed processes: memory never evicted) instead of Python */
};
enum {
	UF_RULE_ZERO = 1,   /* UFFDIO_ZEROPAGE */
	UF_RULE_BUFFER = 2, /* UFFDIO_COPY from manager memory at src + (addr - start) */
	UF_RULE_FILE = 3,   /* read fd at off + (addr - start) through the ring, then COPY */
	UF_RULE_HOLD = 4    /* data on its way to src + (addr - start): faults wait for
			     * uf_rules_settle, which turns the rule into BUFFER */
};
enum {
	UF_EV_ERROR = 0xF0 /* a = -errno, b = address, c = what failed (UF_FAIL_*) */
};
enum {
	UF_FAIL_READ = 1,   /* reading the uffd failed; the engine stopped reading */
	UF_FAIL_RESOLVE = 2,/* a resolver copy/zeropage failed; the fault was NOT resolved */
	UF_FAIL_FILE = 3,   /* a snapshot-file read failed; the fault was NOT resolved */
	UF_FAIL_STORE = 4   /* a swap store read failed; the fault waits and is retried */
};

struct uf_engine_stats {
	uint64_t msgs, faults, resolved, forwarded, events;
	uint64_t eexist, eagain, errors, file_reads, batches, rearms, deferred_now, inflight;
	uint64_t multishot, thread;
	uint64_t retried; /* woken to fault again because the mapping changed under it */
	uint64_t held_now; /* faults waiting on HOLD rules */
};

uf_engine *uf_engine_new(int uffd, unsigned int entries, unsigned int flags, int *err);
int uf_engine_notify_fd(uf_engine *e);
int uf_engine_start(uf_engine *e, int thread);
int uf_engine_poll(uf_engine *e);
size_t uf_engine_take(uf_engine *e, struct uf_msg *out, size_t max);
int uf_engine_unshift(uf_engine *e, const struct uf_msg *msgs, size_t n);
int uf_engine_stop(uf_engine *e);
void uf_engine_free(uf_engine *e);
void uf_engine_get_stats(uf_engine *e, struct uf_engine_stats *out);

int uf_rules_add(uf_engine *e, uint64_t start, uint64_t len, int kind, uint64_t src, int fd, uint64_t off, uint32_t chunk_pages);
int uf_rules_remove(uf_engine *e, uint64_t start, uint64_t len);
size_t uf_rules_list(uf_engine *e, int kind, uint64_t *out, size_t max);
size_t uf_engine_nforks(uf_engine *e);
int64_t uf_rules_fill_all(uf_engine *e);
int uf_rules_settle(uf_engine *e, uint64_t buf, uint64_t buflen, const uint64_t *filled, size_t nfilled);
size_t uf_rules_overlapping(uf_engine *e, uint64_t start, uint64_t len);
int uf_rules_copy(uf_engine *dst, uf_engine *src);
int uf_rules_adopt_fork(uf_engine *dst, uf_engine *src, int child_fd);
size_t uf_rules_count(uf_engine *e);

/* ---- userspace swap (swap.c): stores, page tables, eviction commit ---------------
 * Page states (uf_pt_state): */
enum { UF_PG_NONE = 0, UF_PG_CLEAN = 1, UF_PG_TRANSIT = 2, UF_PG_EVICTED = 3, UF_PG_ZERO = 4 };
enum { UF_STORE_MEMORY = 1, UF_STORE_FILE = 2, UF_STORE_EXTERNAL = 3 };
enum { UF_LAT_BUCKETS = 64, UF_RA_MAX = 32, UF_FT_MAX = 64 };
typedef struct uf_store uf_store;
typedef struct uf_pt uf_pt;
typedef struct uf_budget uf_budget;

struct uf_store_stats {
	uint64_t slots_used, slots_cap, bytes_stored, bytes_in, puts, gets, get_errors, put_errors,
		discards, meta_bytes;
	uint64_t reserved_bytes; /* memory store: the chunks its blobs are carved from */
};
struct uf_pt_stats {
	uint64_t swapins, readahead, first_touch, wp_faults, dirtied, pages_out, pages_out_clean,
		pages_out_zero, put_failures, store_errors;
	uint64_t pages_clean, pages_transit, pages_evicted, pages_zero, table_bytes, epoch,
		readahead_window, fault_around;
	uint64_t clean_missing; /* CLEAN pages found missing and brought back from the store */
	/* eviction time in C, nanoseconds: finding the moved pages in the scratch area,
	 * reading them (process_vm_readv), storing them (compression included), deciding
	 * every page (commit) */
	uint64_t ns_find, ns_read, ns_put, ns_commit;
	uint64_t lat_hist[64]; /* bucket b: [2^p (1 + f/4) - 1, ...) us with p = b / 4, f = b % 4 */
};
struct uf_commit {
	uint64_t evicted, stored, clean, zero, holes, kept, dropped, failed, returned;
	int put_error;  /* -errno of the store when some pages could not be stored */
	int lost_errno; /* -errno of a copy back that failed (the page was unmapped meanwhile) */
};

uf_store *uf_store_memory(int accel, int *err);
uf_store *uf_store_file(int fd, uint64_t max_bytes, int *err);
uf_store *uf_store_memory_adopt(int fd, int accel, int *err);
int uf_store_fd(uf_store *s);
uf_store *uf_store_file_adopt(int fd, int meta_fd, int *err);
int uf_store_file_fd(uf_store *s);
int uf_pt_store_file_fd(uf_pt *pt);
void uf_store_free(uf_store *s);
void uf_store_get_stats(uf_store *s, struct uf_store_stats *out);
int64_t uf_store_put(uf_store *s, const void *pages, size_t n, uint64_t *handles_out);
int uf_store_get(uf_store *s, uint64_t handle, void *out);
void uf_store_unref(uf_store *s, uint64_t handle);
uf_store *uf_store_external(int *err);
int uf_store_external_add(uf_store *s, uint64_t key);
int64_t uf_store_take_discarded(uf_store *s, uint64_t *out, size_t max);

uf_budget *uf_budget_new(int64_t limit_pages, int notify_fd);
void uf_budget_free(uf_budget *b);
void uf_budget_set(uf_budget *b, int64_t limit_pages, int64_t resident_pages);
int64_t uf_budget_resident(uf_budget *b);
uint64_t uf_budget_parked(uf_budget *b);

uf_pt *uf_pt_new(uf_store *store, int *err);
uf_pt *uf_pt_ref(uf_pt *pt);
void uf_pt_unref(uf_pt *pt);
uf_pt *uf_pt_clone(uf_pt *pt);
int uf_pt_fd(uf_pt *pt);
int uf_pt_store_fd(uf_pt *pt);
uf_pt *uf_pt_adopt(uf_store *store, int fd, int *err);
int uf_pt_recover(uf_pt *pt, int pid, int pagemap_fd, uint64_t *out);
int uf_pt_rescue(uf_pt *pt, int pid, int pagemap_fd, uint64_t *out, uf_pt **kids, size_t maxkids,
		 size_t *nkids);
int64_t uf_pt_kid_list(uf_pt *pt, uf_pt **out, size_t max);
int uf_pt_batch_open(uf_pt *pt);
int uf_pt_bound(uf_pt *pt);
void uf_pt_abandon(uf_pt *pt);
void uf_pt_attach(uf_pt *pt, int uffd, int kick_fd, int wp, uf_budget *budget);
void uf_pt_tick(uf_pt *pt);
void uf_pt_exempt(uf_pt *pt, uint32_t tid);
void uf_pt_get_stats(uf_pt *pt, struct uf_pt_stats *out);
int uf_pt_state(uf_pt *pt, uint64_t addr, uint64_t *slot_out);
int64_t uf_pt_begin(uf_pt *pt, const uint64_t *ranges, size_t nranges, uint64_t max_pages,
		    uint64_t *runs_out, size_t max_runs);
int64_t uf_pt_need_read(uf_pt *pt, const uint64_t *present, size_t npresent, uint64_t *out, size_t max_out);
int uf_pt_commit(uf_pt *pt, const uint64_t *moved, size_t nmoved, const uint64_t *read, size_t nread,
		 uint64_t buf, struct uf_commit *res);
int64_t uf_pt_victims(uf_pt *pt, const uint64_t *present, size_t npresent, uint64_t want, uint64_t *out,
		      size_t max_out);
int64_t uf_pt_fill_all(uf_pt *pt);
int64_t uf_pt_pending_put(uf_pt *pt, uint64_t buf, uint64_t *putoff, size_t max);
int uf_pt_commit_external(uf_pt *pt, uint64_t buf, const uint64_t *putoff, const uint64_t *keys,
			  size_t nput, size_t nstored, int put_error, struct uf_commit *res);
int uf_pt_install(uf_pt *pt, uint64_t addr, uint64_t key, const void *data, int write);
int64_t uf_pt_list(uf_pt *pt, int state, uint64_t *out, size_t max);
int64_t uf_pt_settle(uf_pt *pt);
void uf_pt_keep(uf_pt *pt, int on);
int64_t uf_pt_batch_triples(uf_pt *pt, uint64_t scratch, uint64_t *out, size_t max);
int uf_pt_collect(uf_pt *pt, int pid, int pagemap_fd, uint64_t scratch, const uint64_t *moved,
		  size_t nmoved, uint64_t buf, struct uf_commit *res, uint64_t *scratch_used);
int64_t uf_pt_scan(uf_pt *pt, int pagemap_fd, const uint64_t *regions, size_t nregions, uint64_t want,
		   uint64_t *out, size_t max_out, int64_t *nout, uint64_t *shared_out);
/* the engine serves faults from a page table (NULL: none); it holds a reference */
int uf_engine_set_pt(uf_engine *e, uf_pt *pt, int wp, uf_budget *budget);
uf_pt *uf_engine_pt(uf_engine *e);
void uf_engine_kick(uf_engine *e);
int uf_engine_hold(uf_engine *e, int on, int timeout_ms);

/* ---- ptrace: system calls run inside a process that did not cooperate (inject.c) ---- */
struct uf_syscall {
	long nr;
	long args[6];
	long ret; /* raw kernel return: -errno on failure; -ECANCELED if it did not run */
};
/* Stop every thread of pid, run the calls in one of them, restore it exactly, detach.
 * 0 or -errno (-ESRCH gone, -EPERM not permitted or already traced). */
int uf_inject(int pid, struct uf_syscall *calls, int n);

/* ---- the floor: the simplest correct handler, for benchmarks ------------------- */
typedef struct uf_floor uf_floor;
uf_floor *uf_floor_start(int uffd, uint64_t src_page, int cpu, int *err);
int64_t uf_floor_stop(uf_floor *f);

/* ---- target-side helpers (run in a managed process: tests, demo, bench) -------- */
int uf_set_cpu(int cpu);
int64_t uf_touch(uint64_t addr, uint64_t npages, uint64_t stride, int write, uint64_t *lat_ns_out);
void uf_fill(uint64_t addr, uint64_t len, uint64_t seed);
void uf_pattern(uint64_t buf, uint64_t len, uint64_t seed, uint64_t as_addr);
int64_t uf_check(uint64_t addr, uint64_t len, uint64_t seed);
int64_t uf_threads_check(uint64_t addr, uint64_t len, uint64_t seed, int nthreads);
int uf_fork_check(uint64_t addr, uint64_t len, uint64_t seed, uint32_t delay_ms);
uint64_t uf_mmap_anon(uint64_t len);
uint64_t uf_mmap_shared_pair(uint64_t len, uint64_t *alias_out);
uint64_t uf_mremap(uint64_t old, uint64_t oldlen, uint64_t newlen);
int uf_madvise(uint64_t addr, uint64_t len, int advice);
int uf_munmap(uint64_t addr, uint64_t len);

#endif /* UFFDIO_H */
