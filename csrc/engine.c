/*
 * engine.c - the io_uring-driven fault loop and the C resolver.
 *
 * Facts this design rests on (measured on Linux 6.18; see docs/kernel notes):
 *  - A non-blocking uffd polls readable while a message is pending.  An
 *    IORING_OP_READ on it parks on that poll inside io_uring (no io-wq
 *    thread) and completes with n x 32-byte struct uffd_msg.  A BLOCKING uffd
 *    makes the read complete at once with -EINTR: uffds are always O_NONBLOCK.
 *  - IORING_OP_READ_MULTISHOT (6.7+) keeps reading into provided buffers; a
 *    CQE without IORING_CQE_F_MORE means it ended (often -ENOBUFS) and must be
 *    re-armed.  Older kernels answer -EINVAL: fall back to a re-armed READ.
 *  - No io_uring opcode issues UFFDIO_* ioctls, so resolution is a plain
 *    ioctl() from whichever thread processed the message.
 *  - fork/remap/remove/unmap events block the thread that caused them until
 *    the event is read, and until then (and briefly after) the fill ioctls
 *    return EAGAIN.  The messages of one uffd are delivered in order.
 *  - A wake-up of another thread costs 5-50 us in this VM; one event-loop
 *    iteration of Python costs a few tens of microseconds more.
 *
 * Design that follows:
 *  - One engine = one ring for one uffd.  Every fault message is read through
 *    the ring and processed in order by engine_handle_msgs().
 *  - THREAD mode (uf_engine_start(e, 1)): a C thread sleeps in io_uring_enter and
 *    processes each batch.  Faults covered by a rule that Python installed
 *    (zero-fill, a buffer in this process, a file at an offset) are resolved
 *    right there with ioctl() - file data is first read through the same ring
 *    into a staging buffer, never into a managed page.  Everything else
 *    (faults outside rules, WP and MINOR faults, events, errors) is queued
 *    for Python and the eventfd is written once per batch.  A covered fault
 *    never enters Python; a fault Python must see costs one extra wake-up.
 *  - INLINE mode: no thread.  The ring's completions signal the eventfd
 *    (io_uring_register_eventfd); the event loop waits on it and calls
 *    uf_engine_poll(), which runs the same processing without blocking.
 *    Python-handled faults save one wake-up this way.  Measured here with
 *    everything on one CPU: a covered fault costs 1.07x the bare poll/read/
 *    COPY loop in thread mode; a Python coroutine fault costs about 2x the
 *    loop inline but 5x in thread mode.  uffdio therefore runs the thread
 *    when rules exist and inline otherwise (Userfaultfd.serve, thread=None).
 *  - Events change the rules before any later message is looked at: REMOVE
 *    (madvise DONTNEED/FREE/REMOVE by the application) turns the range into
 *    zero-fill, UNMAP drops it, REMAP moves it.  A file read that was in
 *    flight when an event arrived is re-checked against the new rules before
 *    its data is installed (epoch counter), so discarded data never returns.
 *  - A fault whose fill returned EAGAIN is deferred and retried after the
 *    next batch, or after a 50 us ring timeout when no message comes.
 *  - user_data = kind << 56 | index, so that later users of the ring (store
 *    I/O) key their completions into their own tables of pending operations.
 *  - Stopping asks the kernel to cancel every request and waits for every
 *    completion before buffers are freed: nothing the kernel still owns is
 *    released early (the discipline of trio's wait_overlapped).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>

#include <liburing.h>

#include "compat.h"
#include "uffdio.h"
#include "swap.h"

#define UF_PAGE 4096ULL

/* ops.c */
int uf_copy_all_counted(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
			uint64_t *done, uint64_t *eexist);
int uf_zeropage_all_counted(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *done,
			    uint64_t *eexist);
#define UD(kind, idx) (((uint64_t)(kind) << 56) | (uint64_t)(idx))
#define UD_KIND(ud) ((unsigned)((ud) >> 56))
#define UD_IDX(ud) ((ud) & ((1ULL << 56) - 1))

enum { UD_READ = 1, UD_FILE = 2, UD_TIMER = 3, UD_STOP = 4, UD_CANCEL = 5, UD_KICK = 6, UD_HCANCEL = 7 };

#define BGID 7
#define NBUFS 16              /* provided buffers for the multishot read */
#define BUFMSGS 64            /* messages per read */
#define NSLOTS 64             /* file reads in flight */
#define RETRY_NS 50000        /* EAGAIN retry timer */

#define STAT_ADD(field, n) __atomic_fetch_add(&e->st.field, (n), __ATOMIC_RELAXED)

struct rule {
	uint64_t start, end, src, off;
	int kind, fd;
	uint32_t chunk;
};

struct slot {
	int used;
	struct uf_msg msg;  /* the fault that started the read */
	uint64_t dst, len, epoch;
	void *buf;
	size_t bufsz;
};

struct uf_engine {
	int uffd, flags, notify_fd, stop_fd;
	struct io_uring ring;
	int ring_ok;

	/* reading */
	int multishot;
	struct io_uring_buf_ring *br;
	size_t br_size;
	char *bufs;
	char *rdbuf;
	int read_armed;
	int read_poll; /* the read armed is a poll: a table's engine reads itself (uf_pt_read) */
	int read_failed;
	/* the table's copies for the FORK messages of the read being processed, taken by
	 * uf_pt_read, handed out in order (early_next) */
	uf_pt *early[BUFMSGS];
	size_t nearly, early_next;

	/* rules (Python adds them from the loop thread) */
	pthread_mutex_t rules_lock;
	struct rule *rules;
	size_t nrules, caprules;
	uint64_t epoch;
	/* userspace swap: the page table faults outside every rule are decided by */
	uf_pt *pt;
	void *swbuf; /* staging for a swap-in and its read-ahead */
	/* rules as they were at each FORK message, until the child's engine adopts them */
	struct forksnap {
		int fd;
		struct rule *rules;
		size_t n;
		uf_pt *pt;
	} *forks;
	size_t nforks;

	/* file reads */
	struct slot slots[NSLOTS];

	/* faults to retry */
	struct uf_msg *deferred;
	size_t ndeferred, capdeferred;
	/* faults on HOLD rules: retried when uf_rules_settle kicks the engine */
	struct uf_msg *held;
	size_t nheld, capheld;
	int kick_fd, kick_armed;
	uint64_t kick_buf;
	/* uf_engine_hold: no read of the uffd while hold_want (see there) */
	pthread_mutex_t hold_lock;
	pthread_cond_t hold_cv;
	int hold_want, hold_on, hold_cancel_sent, hold_waiters;
	int timer_armed;
	struct __kernel_timespec retry_ts;

	/* queue for Python */
	pthread_mutex_t q_lock;
	struct uf_msg *q;
	size_t qhead, qlen, qcap;
	int pushed;

	/* lifecycle */
	pthread_t thr;
	int thread_started, thread_mode, started, stopping, stop_armed;
	uint64_t inflight;
	uint64_t stop_buf;

	struct uf_engine_stats st;
};

/* ---- queue to Python ----------------------------------------------------------- */

/* Make room for `extra` more records (caller holds q_lock): the queue is a ring
 * buffer, unrolled to the start of a bigger array when it grows. */
static int q_reserve(uf_engine *e, size_t extra)
{
	size_t ncap, i;
	struct uf_msg *nq;

	if (e->qlen + extra <= e->qcap)
		return 0;
	ncap = e->qcap ? e->qcap : 256;
	while (ncap < e->qlen + extra)
		ncap *= 2;
	nq = malloc(ncap * sizeof(*nq));
	if (!nq)
		return -ENOMEM;
	for (i = 0; i < e->qlen; i++)
		nq[i] = e->q[(e->qhead + i) % e->qcap];
	free(e->q);
	e->q = nq;
	e->qcap = ncap;
	e->qhead = 0;
	return 0;
}

static int q_push(uf_engine *e, const struct uf_msg *m)
{
	pthread_mutex_lock(&e->q_lock);
	if (q_reserve(e, 1) < 0) {
		pthread_mutex_unlock(&e->q_lock);
		return -ENOMEM;
	}
	e->q[(e->qhead + e->qlen) % e->qcap] = *m;
	e->qlen++;
	pthread_mutex_unlock(&e->q_lock);
	e->pushed = 1;
	return 0;
}

static void forward(uf_engine *e, const struct uf_msg *m)
{
	if (m->event == UFFD_EVENT_PAGEFAULT)
		STAT_ADD(forwarded, 1);
	if (q_push(e, m) < 0)
		STAT_ADD(errors, 1); /* cannot happen short of OOM; the fault stays unresolved */
}

static void report(uf_engine *e, int err, uint64_t addr, int what)
{
	struct uf_msg m = { .event = UF_EV_ERROR, .a = (uint64_t)(int64_t)err, .b = addr, .c = (uint64_t)what };

	STAT_ADD(errors, 1);
	forward(e, &m);
}

/* Put records that Python took but could not deliver (its server stopped) back at the
 * front of the queue, in order, for the next server. */
int uf_engine_unshift(uf_engine *e, const struct uf_msg *msgs, size_t n)
{
	size_t i;

	pthread_mutex_lock(&e->q_lock);
	if (q_reserve(e, n) < 0) {
		pthread_mutex_unlock(&e->q_lock);
		return -ENOMEM;
	}
	for (i = n; i-- > 0;) {
		e->qhead = (e->qhead + e->qcap - 1) % e->qcap;
		e->q[e->qhead] = msgs[i];
		e->qlen++;
	}
	pthread_mutex_unlock(&e->q_lock);
	return 0;
}

size_t uf_engine_take(uf_engine *e, struct uf_msg *out, size_t max)
{
	size_t n = 0;

	pthread_mutex_lock(&e->q_lock);
	while (n < max && e->qlen) {
		out[n++] = e->q[e->qhead];
		e->qhead = (e->qhead + 1) % e->qcap;
		e->qlen--;
	}
	pthread_mutex_unlock(&e->q_lock);
	return n;
}

/* ---- rules --------------------------------------------------------------------- */

/* rules are kept sorted by start and never overlap */
static size_t rules_lower(uf_engine *e, uint64_t addr)
{
	size_t lo = 0, hi = e->nrules;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (e->rules[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo; /* first rule with end > addr */
}

static int rules_reserve(uf_engine *e, size_t extra)
{
	if (e->nrules + extra > e->caprules) {
		size_t ncap = (e->nrules + extra) * 2;
		struct rule *nr = realloc(e->rules, ncap * sizeof(*nr));
		if (!nr)
			return -ENOMEM;
		e->rules = nr;
		e->caprules = ncap;
	}
	return 0;
}

/* Remove [start, end) from the rules, splitting partly covered ones.
 * Caller holds rules_lock. */
static int rules_punch(uf_engine *e, uint64_t start, uint64_t end)
{
	size_t i = rules_lower(e, start);

	if (rules_reserve(e, 1) < 0)
		return -ENOMEM;
	while (i < e->nrules && e->rules[i].start < end) {
		struct rule *r = &e->rules[i];
		if (r->start < start && r->end > end) { /* split in two */
			struct rule tail = *r;
			uint64_t cut = end - r->start;
			tail.start = end;
			if (tail.kind != UF_RULE_ZERO) {
				tail.src += cut;
				tail.off += cut;
			}
			r->end = start;
			memmove(&e->rules[i + 2], &e->rules[i + 1], (e->nrules - i - 1) * sizeof(*r));
			e->rules[i + 1] = tail;
			e->nrules++;
			return 0;
		}
		if (r->start < start) { /* cut the tail */
			r->end = start;
			i++;
			continue;
		}
		if (r->end > end) { /* cut the head */
			uint64_t cut = end - r->start;
			r->start = end;
			if (r->kind != UF_RULE_ZERO) {
				r->src += cut;
				r->off += cut;
			}
			break;
		}
		memmove(&e->rules[i], &e->rules[i + 1], (e->nrules - i - 1) * sizeof(*r));
		e->nrules--;
	}
	return 0;
}

static int rules_insert(uf_engine *e, const struct rule *nr)
{
	size_t i;
	int rc = rules_punch(e, nr->start, nr->end);

	if (rc < 0 || (rc = rules_reserve(e, 1)) < 0)
		return rc;
	i = rules_lower(e, nr->start);
	memmove(&e->rules[i + 1], &e->rules[i], (e->nrules - i) * sizeof(*nr));
	e->rules[i] = *nr;
	e->nrules++;
	return 0;
}

int uf_rules_add(uf_engine *e, uint64_t start, uint64_t len, int kind, uint64_t src, int fd, uint64_t off,
		 uint32_t chunk_pages)
{
	struct rule r = { .start = start, .end = start + len, .src = src, .off = off, .kind = kind, .fd = fd,
			  .chunk = chunk_pages ? chunk_pages : 1 };
	int rc;

	if ((start | len) & (UF_PAGE - 1) || !len || start + len < start)
		return -EINVAL;
	if (kind < UF_RULE_ZERO || kind > UF_RULE_HOLD)
		return -EINVAL;
	pthread_mutex_lock(&e->rules_lock);
	rc = rules_insert(e, &r);
	pthread_mutex_unlock(&e->rules_lock);
	return rc;
}

int uf_rules_remove(uf_engine *e, uint64_t start, uint64_t len)
{
	int rc;

	pthread_mutex_lock(&e->rules_lock);
	rc = rules_punch(e, start, start + len);
	e->epoch++;
	pthread_mutex_unlock(&e->rules_lock);
	return rc;
}

/* Settle the HOLD rules whose source lies in [buf, buf + buflen): the parts whose
 * source offset lies in one of the (offset, length) pairs of `filled` become
 * BUFFER rules (the data is there now); the rest are dropped (the page never
 * left, or the rule was voided).  Rules moved by REMAP are found by their
 * source, not their address, which is why HOLD carries one.  Faults waiting on
 * HOLD rules are then decided again.  Returns the number of pages now BUFFER. */
/* uf_rules_settle on e->rules (rules_lock held): the pages now BUFFER, or -errno. */
static int64_t settle_locked(uf_engine *e, uint64_t buf, uint64_t buflen, const uint64_t *filled, size_t nfilled)
{
	struct rule *held = NULL;
	size_t nh = 0, i, k;
	int64_t pages = 0;
	int rc = 0;

	for (i = 0; i < e->nrules; i++) {
		struct rule *r = &e->rules[i];
		if (r->kind == UF_RULE_HOLD && r->src >= buf && r->src < buf + buflen)
			nh++;
	}
	if (nh && !(held = malloc(nh * sizeof(*held))))
		return -ENOMEM;
	for (i = 0, k = 0; i < e->nrules; i++) {
		struct rule *r = &e->rules[i];
		if (r->kind == UF_RULE_HOLD && r->src >= buf && r->src < buf + buflen)
			held[k++] = *r;
	}
	for (i = 0; i < nh && rc == 0; i++) {
		struct rule *h = &held[i];
		rc = rules_punch(e, h->start, h->end);
		for (k = 0; k + 2 <= nfilled * 2 && rc == 0; k += 2) {
			uint64_t fs = buf + filled[k], fe = fs + filled[k + 1];
			uint64_t rs = h->src, re = h->src + (h->end - h->start);
			uint64_t s = rs > fs ? rs : fs, en = re < fe ? re : fe;
			if (s >= en)
				continue;
			struct rule b = *h;
			b.kind = UF_RULE_BUFFER;
			b.start = h->start + (s - rs);
			b.end = h->start + (en - rs);
			b.src = s;
			rc = rules_insert(e, &b);
			pages += (int64_t)((en - s) / UF_PAGE);
		}
	}
	free(held);
	return rc < 0 ? rc : pages;
}

int uf_rules_settle(uf_engine *e, uint64_t buf, uint64_t buflen, const uint64_t *filled, size_t nfilled)
{
	int64_t pages;
	uint64_t one = 1;
	size_t i;

	pthread_mutex_lock(&e->rules_lock);
	pages = settle_locked(e, buf, buflen, filled, nfilled);
	/* The rules of children forked while the batch was in flight, kept until their
	 * engines adopt them (the FORK message is read, its child not made yet): settled
	 * alike - a child made after this call would otherwise keep HOLD rules that nobody
	 * settles, and its threads would wait on them forever.  (The snapshot's array is
	 * put in the engine's place for the call, and back.) */
	for (i = 0; i < e->nforks && pages >= 0; i++) {
		struct rule *r = e->rules;
		size_t n = e->nrules, cap = e->caprules;
		int64_t rc;
		e->rules = e->forks[i].rules;
		e->nrules = e->caprules = e->forks[i].n;
		rc = settle_locked(e, buf, buflen, filled, nfilled);
		e->forks[i].rules = e->rules;
		e->forks[i].n = e->nrules;
		e->rules = r;
		e->nrules = n;
		e->caprules = cap;
		if (rc < 0)
			pages = rc;
	}
	e->epoch++;
	pthread_mutex_unlock(&e->rules_lock);
	if (write(e->kick_fd, &one, sizeof(one)) < 0) {
		/* EAGAIN: a kick is already pending */
	}
	return (int)pages;
}

/* Copy the rules of one kind (0: all) as (start, end, kind, src) quadruples. */
size_t uf_rules_list(uf_engine *e, int kind, uint64_t *out, size_t max)
{
	size_t i, n = 0;

	pthread_mutex_lock(&e->rules_lock);
	for (i = 0; i < e->nrules && n < max; i++) {
		struct rule *r = &e->rules[i];
		if (kind && r->kind != kind)
			continue;
		out[4 * n] = r->start;
		out[4 * n + 1] = r->end;
		out[4 * n + 2] = (uint64_t)r->kind;
		out[4 * n + 3] = r->src;
		n++;
	}
	pthread_mutex_unlock(&e->rules_lock);
	return n;
}

/* Install every page that a BUFFER rule holds and that is missing (UFFDIO_COPY;
 * pages already present are skipped by the kernel with EEXIST).  Used before a
 * fork that the kernel cannot follow (no EVENT_FORK) and before giving a
 * process back.  Returns pages copied or -errno; -EAGAIN when events are
 * pending (drain them and call again). */
int64_t uf_rules_fill_all(uf_engine *e)
{
	struct rule *rs;
	size_t n, i;
	int64_t pages = 0;
	int rc = 0;

	pthread_mutex_lock(&e->rules_lock);
	n = e->nrules;
	rs = malloc((n ? n : 1) * sizeof(*rs));
	if (rs && n)
		memcpy(rs, e->rules, n * sizeof(*rs));
	pthread_mutex_unlock(&e->rules_lock);
	if (!rs)
		return -ENOMEM;
	for (i = 0; i < n && rc == 0; i++) {
		uint64_t done = 0, ex = 0;
		if (rs[i].kind != UF_RULE_BUFFER)
			continue;
		rc = uf_copy_all_counted(e->uffd, rs[i].start, rs[i].src, rs[i].end - rs[i].start, 0, &done, &ex);
		pages += (int64_t)((done / UF_PAGE) - ex);
		if (rc == -ENOENT || rc == -ESRCH)
			rc = 0; /* unmapped meanwhile, or the process exited: nothing to bring back */
	}
	free(rs);
	return rc < 0 ? rc : pages;
}

/* Give the engine of a forked child the parent's rules as they were when the FORK
 * message was processed (later events of the parent must not leak into the child).
 * Returns 1 when a snapshot was found, 0 when the current rules were copied instead. */
int uf_rules_adopt_fork(uf_engine *dst, uf_engine *src, int child_fd)
{
	struct forksnap snap = { -1, NULL, 0, NULL };
	size_t i;
	int rc = 0, found = 0;

	pthread_mutex_lock(&src->rules_lock);
	for (i = 0; i < src->nforks; i++) {
		if (src->forks[i].fd == child_fd) {
			snap = src->forks[i];
			src->forks[i] = src->forks[--src->nforks];
			found = 1;
			break;
		}
	}
	pthread_mutex_unlock(&src->rules_lock);
	if (found && snap.pt) {
		pthread_mutex_lock(&dst->rules_lock);
		if (dst->pt)
			uf_pt_unref(dst->pt);
		dst->pt = snap.pt; /* the reference taken by the clone */
		uf_pt_bind(dst->pt, dst->uffd, dst->kick_fd);
		if (!dst->swbuf && posix_memalign(&dst->swbuf, UF_PAGE, (UF_RA_MAX + 1) * UF_PAGE))
			dst->swbuf = NULL;
		pthread_mutex_unlock(&dst->rules_lock);
	}
	if (!found)
		return uf_rules_copy(dst, src) < 0 ? -ENOMEM : 0;
	pthread_mutex_lock(&dst->rules_lock);
	for (i = 0; i < snap.n && rc == 0; i++)
		rc = rules_insert(dst, &snap.rules[i]);
	pthread_mutex_unlock(&dst->rules_lock);
	free(snap.rules);
	return rc < 0 ? rc : 1;
}

/* Fork snapshots read with their FORK event and not yet taken by the child's engine
 * (uf_rules_adopt_fork). */
size_t uf_engine_nforks(uf_engine *e)
{
	size_t n;

	pthread_mutex_lock(&e->rules_lock);
	n = e->nforks;
	pthread_mutex_unlock(&e->rules_lock);
	return n;
}

size_t uf_rules_overlapping(uf_engine *e, uint64_t start, uint64_t len)
{
	size_t i, n = 0;

	pthread_mutex_lock(&e->rules_lock);
	for (i = rules_lower(e, start); i < e->nrules && e->rules[i].start < start + len; i++)
		n++;
	pthread_mutex_unlock(&e->rules_lock);
	return n;
}

size_t uf_rules_count(uf_engine *e)
{
	size_t n;

	pthread_mutex_lock(&e->rules_lock);
	n = e->nrules;
	pthread_mutex_unlock(&e->rules_lock);
	return n;
}

int uf_rules_copy(uf_engine *dst, uf_engine *src)
{
	int rc = 0;
	size_t i;

	pthread_mutex_lock(&src->rules_lock);
	pthread_mutex_lock(&dst->rules_lock);
	for (i = 0; i < src->nrules && rc == 0; i++)
		rc = rules_insert(dst, &src->rules[i]);
	pthread_mutex_unlock(&dst->rules_lock);
	pthread_mutex_unlock(&src->rules_lock);
	return rc;
}

/* Apply a non-cooperative event to the rules.  Called in message order. */
static void rules_event(uf_engine *e, const struct uf_msg *m)
{
	size_t k;

	if (e->pt)
		uf_pt_event(e->pt, m);
	/* the copies taken for the FORKs further on in this read: an unmap or a remap
	 * read before the FORK was done before it, as far as the order of the messages can
	 * tell; a REMOVE read before it was not - the thread that discards waits for its
	 * message to be read before it zaps, so the child's copy holds the data */
	for (k = e->early_next; m->event != UFFD_EVENT_REMOVE && k < e->nearly; k++)
		if (e->early[k])
			uf_pt_event(e->early[k], m);
	pthread_mutex_lock(&e->rules_lock);
	switch (m->event) {
	case UFFD_EVENT_FORK: { /* a = the child's uffd: snapshot the rules as of the fork */
		struct forksnap *nf = realloc(e->forks, (e->nforks + 1) * sizeof(*nf));
		if (nf) {
			e->forks = nf;
			nf[e->nforks].fd = (int)(uint32_t)m->a;
			nf[e->nforks].n = e->nrules;
			nf[e->nforks].rules = malloc((e->nrules ? e->nrules : 1) * sizeof(struct rule));
			nf[e->nforks].pt = NULL;
			if (e->early_next < e->nearly)
				nf[e->nforks].pt = e->early[e->early_next++];
			if (!nf[e->nforks].pt && e->pt) /* (the copy at the read failed, or the
							  * read was not a table's) */
				nf[e->nforks].pt = uf_pt_clone(e->pt);
			if (nf[e->nforks].rules) {
				if (e->nrules) /* memcpy from NULL is undefined even for 0 bytes */
					memcpy(nf[e->nforks].rules, e->rules, e->nrules * sizeof(struct rule));
				e->nforks++;
			} else if (nf[e->nforks].pt) {
				uf_pt_unref(nf[e->nforks].pt);
			}
		}
		break;
	}
	case UFFD_EVENT_REMOVE: { /* a = start, b = end: the app discarded the data */
		struct rule z = { .start = m->a, .end = m->b, .kind = UF_RULE_ZERO, .fd = -1, .chunk = 1 };
		size_t i = rules_lower(e, m->a);
		/* only where a rule existed: elsewhere Python owns the page */
		uint64_t s, t;
		struct rule *cov = NULL;
		size_t ncov = 0, k;
		for (k = i; k < e->nrules && e->rules[k].start < m->b; k++)
			ncov++;
		if (ncov) {
			cov = malloc(ncov * sizeof(*cov));
			if (cov)
				memcpy(cov, &e->rules[i], ncov * sizeof(*cov));
		}
		rules_punch(e, m->a, m->b);
		for (k = 0; cov && k < ncov; k++) {
			s = cov[k].start > m->a ? cov[k].start : m->a;
			t = cov[k].end < m->b ? cov[k].end : m->b;
			z.start = s;
			z.end = t;
			if (s < t)
				rules_insert(e, &z);
		}
		free(cov);
		break;
	}
	case UFFD_EVENT_UNMAP: /* a = start, b = end */
		rules_punch(e, m->a, m->b);
		break;
	case UFFD_EVENT_REMAP: { /* a = from, b = to, c = len */
		size_t i = rules_lower(e, m->a), k, n = 0;
		struct rule *mv;
		for (k = i; k < e->nrules && e->rules[k].start < m->a + m->c; k++)
			n++;
		mv = n ? malloc(n * sizeof(*mv)) : NULL;
		if (mv)
			memcpy(mv, &e->rules[i], n * sizeof(*mv));
		rules_punch(e, m->a, m->a + m->c);
		for (k = 0; mv && k < n; k++) {
			struct rule r = mv[k];
			if (r.start < m->a) {
				if (r.kind != UF_RULE_ZERO) {
					r.src += m->a - r.start;
					r.off += m->a - r.start;
				}
				r.start = m->a;
			}
			if (r.end > m->a + m->c)
				r.end = m->a + m->c;
			r.start = r.start - m->a + m->b;
			r.end = r.end - m->a + m->b;
			rules_insert(e, &r);
		}
		free(mv);
		break;
	}
	default:
		break;
	}
	e->epoch++;
	pthread_mutex_unlock(&e->rules_lock);
}

/* ---- ring helpers ---------------------------------------------------------------- */

static struct io_uring_sqe *get_sqe(uf_engine *e)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);

	if (!sqe) {
		io_uring_submit(&e->ring);
		sqe = io_uring_get_sqe(&e->ring);
	}
	return sqe;
}

static int arm_read(uf_engine *e)
{
	struct io_uring_sqe *sqe;

	if (e->read_armed || e->stopping || e->read_failed ||
	    __atomic_load_n(&e->hold_want, __ATOMIC_ACQUIRE))
		return 0;
	sqe = get_sqe(e);
	if (!sqe)
		return -EBUSY;
	e->read_poll = e->pt != NULL;
	if (e->read_poll) {
		io_uring_prep_poll_add(sqe, e->uffd, POLLIN);
	} else if (e->multishot) {
		io_uring_prep_rw(IORING_OP_READ_MULTISHOT, sqe, e->uffd, NULL, 0, 0);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = BGID;
	} else {
		io_uring_prep_read(sqe, e->uffd, e->rdbuf, BUFMSGS * sizeof(struct uf_msg), 0);
	}
	io_uring_sqe_set_data64(sqe, UD(UD_READ, 0));
	e->read_armed = 1;
	e->inflight++;
	STAT_ADD(rearms, 1);
	return 0;
}

static void arm_timer(uf_engine *e)
{
	struct io_uring_sqe *sqe;

	if (e->timer_armed || e->stopping)
		return;
	sqe = get_sqe(e);
	if (!sqe)
		return;
	e->retry_ts.tv_sec = 0;
	e->retry_ts.tv_nsec = RETRY_NS;
	io_uring_prep_timeout(sqe, &e->retry_ts, 0, 0);
	io_uring_sqe_set_data64(sqe, UD(UD_TIMER, 0));
	e->timer_armed = 1;
	e->inflight++;
}

static void arm_stop_poll(uf_engine *e)
{
	struct io_uring_sqe *sqe = get_sqe(e);

	io_uring_prep_poll_add(sqe, e->stop_fd, POLLIN);
	io_uring_sqe_set_data64(sqe, UD(UD_STOP, 0));
	e->stop_armed = 1;
	e->inflight++;
}

static void msg_push(uf_engine *e, struct uf_msg **arr, size_t *n, size_t *cap, const struct uf_msg *m)
{
	if (*n == *cap) {
		size_t ncap = *cap ? *cap * 2 : 64;
		struct uf_msg *nd = realloc(*arr, ncap * sizeof(*nd));
		if (!nd) {
			forward(e, m); /* let Python have it rather than lose it */
			return;
		}
		*arr = nd;
		*cap = ncap;
	}
	(*arr)[(*n)++] = *m;
}

static void defer(uf_engine *e, const struct uf_msg *m)
{
	msg_push(e, &e->deferred, &e->ndeferred, &e->capdeferred, m);
}

static void arm_kick_poll(uf_engine *e)
{
	struct io_uring_sqe *sqe;

	if (e->kick_armed || e->stopping)
		return;
	sqe = get_sqe(e);
	if (!sqe)
		return;
	io_uring_prep_read(sqe, e->kick_fd, &e->kick_buf, sizeof(e->kick_buf), 0);
	io_uring_sqe_set_data64(sqe, UD(UD_KICK, 0));
	e->kick_armed = 1;
	e->inflight++;
}

/* ---- fault resolution -------------------------------------------------------------- */

static int lookup(uf_engine *e, uint64_t addr, struct rule *out, uint64_t *epoch)
{
	size_t i;
	int found = 0;

	pthread_mutex_lock(&e->rules_lock);
	i = rules_lower(e, addr);
	if (i < e->nrules && e->rules[i].start <= addr) {
		*out = e->rules[i];
		found = 1;
	}
	*epoch = e->epoch;
	pthread_mutex_unlock(&e->rules_lock);
	return found;
}

/* The outcome of a fill: resolved, deferred (EAGAIN), or failed.  ESRCH (the
 * target exited) and ENOENT (the mapping is gone) void the fault: nobody is
 * left waiting on it. */
static int copy_counted(uf_engine *e, uint64_t dst, uint64_t src, uint64_t len, uint64_t *done)
{
	uint64_t ex = 0;
	int rc = uf_copy_all_counted(e->uffd, dst, src, len, 0, done, &ex);

	if (ex)
		STAT_ADD(eexist, ex);
	return rc;
}

static int zeropage_counted(uf_engine *e, uint64_t dst, uint64_t len, uint64_t *done)
{
	uint64_t ex = 0;
	int rc = uf_zeropage_all_counted(e->uffd, dst, len, 0, done, &ex);

	if (ex)
		STAT_ADD(eexist, ex);
	return rc;
}

static void fill_outcome(uf_engine *e, const struct uf_msg *m, uint64_t addr, int rc, uint64_t done)
{
	if (rc == 0 || done >= UF_PAGE) {
		STAT_ADD(resolved, 1);
		return;
	}
	if (rc == -EAGAIN) {
		STAT_ADD(eagain, 1);
		defer(e, m);
		return;
	}
	if (rc == -ESRCH)
		return; /* the target exited: nobody waits */
	if (rc == -ENOENT) { /* fill_all woke the range: the thread retries the access */
		STAT_ADD(retried, 1);
		return;
	}
	report(e, rc, addr, UF_FAIL_RESOLVE);
	forward(e, m);
}

static void swap_fault(uf_engine *e, const struct uf_msg *m)
{
	int what = 0, rc;

	if (!e->swbuf) {
		forward(e, m);
		return;
	}
	{
		/* fault-around stops where the next rule begins: its pages are the rule's */
		uint64_t fa_end = UINT64_MAX;
		size_t i;
		pthread_mutex_lock(&e->rules_lock);
		i = rules_lower(e, m->b);
		if (i < e->nrules)
			fa_end = e->rules[i].start;
		pthread_mutex_unlock(&e->rules_lock);
		rc = uf_swap_fault(e->pt, (struct uf_msg *)m, e->swbuf, &what, fa_end);
	}

	switch (rc) {
	case SWAP_DONE:
		STAT_ADD(resolved, 1);
		return;
	case SWAP_PARK:
		msg_push(e, &e->held, &e->nheld, &e->capheld, m);
		__atomic_store_n(&e->st.held_now, e->nheld, __ATOMIC_RELAXED);
		return;
	case SWAP_DEFER:
		STAT_ADD(eagain, 1);
		defer(e, m);
		return;
	case SWAP_PASS:
		forward(e, m);
		return;
	}
	if (what == UF_FAIL_STORE) {
		/* the store could not give the page back: the thread keeps waiting (it must not
		 * see zeros), the read is tried again at the next kick (the policy kicks every
		 * round), and the failure is reported once per fault */
		if (!m->reserved2)
			report(e, rc, m->b, what);
		((struct uf_msg *)m)->reserved2 = 1;
		msg_push(e, &e->held, &e->nheld, &e->capheld, m);
		return;
	}
	report(e, rc, m->b, what);
	forward(e, m);
}

static void handle_fault(uf_engine *e, const struct uf_msg *m)
{
	uint64_t addr = m->b & ~(UF_PAGE - 1), len, done = 0, epoch;
	struct rule r;
	int rc;

	if (m->a & UFFD_PAGEFAULT_FLAG_MINOR) {
		forward(e, m);
		return;
	}
	if (m->a & UFFD_PAGEFAULT_FLAG_WP) {
		if (e->pt)
			swap_fault(e, m);
		else
			forward(e, m);
		return;
	}
	if (!lookup(e, addr, &r, &epoch)) {
		if (e->pt) {
			swap_fault(e, m);
			return;
		}
		if (e->flags & UF_ENGINE_DEFAULT_ZERO) { /* never-evicted memory: first touch */
			rc = zeropage_counted(e, addr, UF_PAGE, &done);
			fill_outcome(e, m, addr, rc, done);
			return;
		}
		forward(e, m);
		return;
	}
	len = (uint64_t)r.chunk * UF_PAGE;
	if (len > r.end - addr)
		len = r.end - addr;

	switch (r.kind) {
	case UF_RULE_ZERO:
		rc = zeropage_counted(e, addr, len, &done);
		fill_outcome(e, m, addr, rc, done);
		return;
	case UF_RULE_BUFFER:
		rc = copy_counted(e, addr, r.src + (addr - r.start), len, &done);
		fill_outcome(e, m, addr, rc, done);
		return;
	case UF_RULE_HOLD: /* the data is on its way: wait for uf_rules_settle */
		msg_push(e, &e->held, &e->nheld, &e->capheld, m);
		__atomic_store_n(&e->st.held_now, e->nheld, __ATOMIC_RELAXED);
		return;
	case UF_RULE_FILE: {
		struct io_uring_sqe *sqe;
		int i;
		for (i = 0; i < NSLOTS && e->slots[i].used; i++)
			;
		if (i == NSLOTS || e->stopping) {
			defer(e, m);
			return;
		}
		struct slot *s = &e->slots[i];
		if (s->bufsz < len) {
			void *nb;
			if (posix_memalign(&nb, UF_PAGE, len)) {
				defer(e, m);
				return;
			}
			free(s->buf);
			s->buf = nb;
			s->bufsz = len;
		}
		sqe = get_sqe(e);
		if (!sqe) {
			defer(e, m);
			return;
		}
		s->used = 1;
		s->msg = *m;
		s->dst = addr;
		s->len = len;
		s->epoch = epoch;
		io_uring_prep_read(sqe, r.fd, s->buf, (unsigned)len, r.off + (addr - r.start));
		io_uring_sqe_set_data64(sqe, UD(UD_FILE, i));
		e->inflight++;
		STAT_ADD(file_reads, 1);
		return;
	}
	}
	forward(e, m);
}

static void file_done(uf_engine *e, unsigned i, int res)
{
	struct slot *s = &e->slots[i];
	struct uf_msg m = s->msg;
	uint64_t done = 0;
	int rc;

	s->used = 0;
	if (e->stopping) {
		/* cancelled by a stop: wake the faulting thread; it faults again and the
		 * message waits in the uffd for whoever serves next */
		uf_wake(e->uffd, s->dst, UF_PAGE);
		return;
	}
	if (res < 0) {
		report(e, res, s->dst, UF_FAIL_FILE);
		forward(e, &m);
		return;
	}
	if ((uint64_t)res < s->len) /* past the end of the file: zeros, as documented */
		memset((char *)s->buf + res, 0, s->len - (uint64_t)res);
	pthread_mutex_lock(&e->rules_lock);
	rc = (s->epoch != e->epoch);
	pthread_mutex_unlock(&e->rules_lock);
	if (rc) { /* an event changed the rules while the read was in flight: decide again */
		struct rule r;
		uint64_t ep;
		if (lookup(e, s->dst, &r, &ep)) {
			handle_fault(e, &m);
		} else {
			/* no rule any more (unmapped, or handed to Python): wake the thread; if
			 * the page is still missing and registered it faults again and that
			 * message is decided afresh - nothing stale is installed */
			uf_wake(e->uffd, s->dst, UF_PAGE);
			STAT_ADD(retried, 1);
		}
		return;
	}
	rc = copy_counted(e, s->dst, (uint64_t)(uintptr_t)s->buf, s->len, &done);
	fill_outcome(e, &m, s->dst, rc, done);
}

static void handle_msgs(uf_engine *e, const struct uf_msg *msgs, size_t n)
{
	size_t i;

	STAT_ADD(msgs, n);
	STAT_ADD(batches, 1);
	for (i = 0; i < n; i++) {
		const struct uf_msg *m = &msgs[i];
		if (m->event == UFFD_EVENT_PAGEFAULT) {
			STAT_ADD(faults, 1);
			uf_swap_stamp((struct uf_msg *)m);
			handle_fault(e, m);
		} else {
			STAT_ADD(events, 1);
			rules_event(e, m);
			forward(e, m);
		}
	}
}

static void retry_deferred(uf_engine *e)
{
	size_t n = e->ndeferred, i;
	struct uf_msg *d;

	if (!n)
		return;
	d = e->deferred;
	e->deferred = NULL;
	e->ndeferred = e->capdeferred = 0;
	for (i = 0; i < n; i++)
		handle_fault(e, &d[i]);
	free(d);
}

/* ---- completion processing ----------------------------------------------------------- */

/* A table's engine: the poll on the uffd fired; read with the table locked (see
 * uf_pt_read for why), up to 8 reads, so that the other completions get their turn (the
 * poll armed again fires at once when more messages wait). */
static void read_locked(uf_engine *e)
{
	int round;

	for (round = 0; round < 8; round++) {
		size_t nc = 0, k;
		ssize_t n;
		if (e->stopping || __atomic_load_n(&e->hold_want, __ATOMIC_ACQUIRE) || !e->pt)
			return;
		n = uf_pt_read(e->pt, e->uffd, e->rdbuf, BUFMSGS * sizeof(struct uf_msg), e->early, BUFMSGS, &nc);
		if (n <= 0) {
			if (n < 0 && n != -EAGAIN && n != -EINTR) {
				e->read_failed = 1;
				report(e, (int)n, 0, UF_FAIL_READ);
			}
			return;
		}
		e->nearly = nc;
		e->early_next = 0;
		handle_msgs(e, (struct uf_msg *)e->rdbuf, (size_t)n / sizeof(struct uf_msg));
		for (k = e->early_next; k < e->nearly; k++) /* (none: one per FORK message) */
			if (e->early[k])
				uf_pt_unref(e->early[k]);
		e->nearly = e->early_next = 0;
		if ((size_t)n < BUFMSGS * sizeof(struct uf_msg))
			return;
	}
}

static void on_read(uf_engine *e, struct io_uring_cqe *cqe)
{
	int more = !e->read_poll && e->multishot && (cqe->flags & IORING_CQE_F_MORE);

	if (e->read_poll) {
		if (cqe->res > 0) {
			read_locked(e);
		} else if (cqe->res < 0 && cqe->res != -EAGAIN && cqe->res != -EINTR && cqe->res != -ECANCELED) {
			e->read_failed = 1; /* (not armed again: no spinning on a poll that fails) */
			report(e, cqe->res, 0, UF_FAIL_READ);
		}
	} else if (cqe->res > 0) {
		if (e->multishot) {
			unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
			char *b = e->bufs + (size_t)bid * BUFMSGS * sizeof(struct uf_msg);
			handle_msgs(e, (struct uf_msg *)b, (size_t)cqe->res / sizeof(struct uf_msg));
			io_uring_buf_ring_add(e->br, b, BUFMSGS * sizeof(struct uf_msg), bid,
					      io_uring_buf_ring_mask(NBUFS), 0);
			io_uring_buf_ring_advance(e->br, 1);
		} else {
			handle_msgs(e, (struct uf_msg *)e->rdbuf, (size_t)cqe->res / sizeof(struct uf_msg));
		}
	} else if (cqe->res == -EINVAL && e->multishot && !more) {
		e->multishot = 0; /* kernel without READ_MULTISHOT: re-armed single reads */
		__atomic_store_n(&e->st.multishot, 0, __ATOMIC_RELAXED);
	} else if (cqe->res < 0 && cqe->res != -EAGAIN && cqe->res != -EINTR && cqe->res != -ENOBUFS &&
		   cqe->res != -ECANCELED) {
		e->read_failed = 1;
		report(e, cqe->res, 0, UF_FAIL_READ);
	}
	if (!more) {
		e->read_armed = 0;
		e->inflight--;
		arm_read(e);
	}
}

static void begin_stop(uf_engine *e)
{
	struct io_uring_sqe *sqe;

	size_t i;

	if (e->stopping)
		return;
	e->stopping = 1;
	/* held faults: wake them; they fault again and wait in the uffd for the next server */
	for (i = 0; i < e->nheld; i++)
		uf_wake(e->uffd, e->held[i].b & ~(UF_PAGE - 1), UF_PAGE);
	e->nheld = 0;
	sqe = get_sqe(e);
	if (sqe) {
		io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL);
		io_uring_sqe_set_data64(sqe, UD(UD_CANCEL, 0));
		e->inflight++;
	}
}

static void hold_step(uf_engine *e);

static void process_cqes(uf_engine *e)
{
	struct io_uring_cqe *cqe;

	while (io_uring_peek_cqe(&e->ring, &cqe) == 0) {
		uint64_t ud = io_uring_cqe_get_data64(cqe);
		switch (UD_KIND(ud)) {
		case UD_READ:
			on_read(e, cqe);
			break;
		case UD_FILE:
			e->inflight--;
			file_done(e, (unsigned)UD_IDX(ud), cqe->res);
			break;
		case UD_TIMER:
			e->inflight--;
			e->timer_armed = 0;
			break;
		case UD_STOP:
			e->inflight--;
			e->stop_armed = 0;
			begin_stop(e);
			break;
		case UD_CANCEL:
			e->inflight--;
			break;
		case UD_HCANCEL:
			e->inflight--;
			/* not found (the read ended meanwhile: its completion says so) or refused:
			 * hold_step sends another while the read is still armed */
			if (cqe->res < 0 && cqe->res != -EALREADY)
				e->hold_cancel_sent = 0;
			break;
		case UD_KICK:
			e->inflight--;
			e->kick_armed = 0;
			if (!e->stopping) {
				size_t i, n = e->nheld;
				struct uf_msg *h = e->held;
				arm_kick_poll(e);
				e->held = NULL;
				e->nheld = e->capheld = 0;
				for (i = 0; i < n; i++)
					defer(e, &h[i]); /* decided again below, against the settled rules */
				free(h);
			}
			break;
		}
		io_uring_cqe_seen(&e->ring, cqe);
	}
	if (!e->stopping) {
		retry_deferred(e);
		if (e->ndeferred)
			arm_timer(e);
	}
	hold_step(e);
	__atomic_store_n(&e->st.deferred_now, e->ndeferred, __ATOMIC_RELAXED);
	__atomic_store_n(&e->st.held_now, e->nheld, __ATOMIC_RELAXED);
	__atomic_store_n(&e->st.inflight, e->inflight, __ATOMIC_RELAXED);
}

/* ---- holding reads (uf_engine_hold) -------------------------------------------------- */

/* Called after every round of completions: take the hold (cancel the read, then say so
 * once it has ended - every message read before is processed by then) or let it go
 * (arm the read again). */
static void hold_step(uf_engine *e)
{
	int want = __atomic_load_n(&e->hold_want, __ATOMIC_ACQUIRE);
	/* a table given to an engine whose read was armed before: that read is ended and
	 * the poll armed in its place (uf_pt_read) */
	int rearm = e->read_armed && !e->read_poll && e->pt && !e->stopping;

	if ((want || rearm) && e->read_armed && !e->hold_cancel_sent) {
		struct io_uring_sqe *sqe = get_sqe(e);
		if (sqe) {
			io_uring_prep_cancel64(sqe, UD(UD_READ, 0), 0);
			io_uring_sqe_set_data64(sqe, UD(UD_HCANCEL, 0));
			e->inflight++;
			e->hold_cancel_sent = 1;
		}
	}
	if (want && (!e->read_armed || e->stopping) && !e->hold_on) {
		pthread_mutex_lock(&e->hold_lock);
		e->hold_on = 1;
		pthread_cond_broadcast(&e->hold_cv);
		pthread_mutex_unlock(&e->hold_lock);
	}
	if (!want && e->hold_on) {
		pthread_mutex_lock(&e->hold_lock);
		e->hold_on = 0;
		pthread_mutex_unlock(&e->hold_lock);
	}
	if (!e->read_armed)
		e->hold_cancel_sent = 0;
	if (!want)
		arm_read(e);
}

/* Stop reading the uffd (on = 1) until it is let go (on = 0).  Returns once no read is
 * armed and every message read so far has been processed (its events applied to the
 * page table), 0; -ESRCH if the engine stopped, -ETIMEDOUT after timeout_ms, -EINVAL
 * without the engine's thread.
 *
 * What it is for: the kernel lets a thread that unmaps (or remaps, or discards) a
 * registered range go on only once its event has been read, and until then every
 * UFFDIO_MOVE on the uffd fails with EAGAIN.  So while no read is armed, no registered
 * mapping can be replaced under a MOVE: an eviction computes what to move after the
 * hold is taken (every event before it applied) and moves under it, and a page it
 * moves is the page its table describes, never one of a mapping made meanwhile.
 * Faults of the process wait while the hold lasts (they are read after it). */
int uf_engine_hold(uf_engine *e, int on, int timeout_ms)
{
	struct timespec dl;
	int rc = 0;

	if (!e->thread_mode)
		return -EINVAL;
	if (!on) {
		__atomic_store_n(&e->hold_want, 0, __ATOMIC_RELEASE);
		uf_engine_kick(e);
		return 0;
	}
	__atomic_store_n(&e->hold_want, 1, __ATOMIC_RELEASE);
	uf_engine_kick(e);
	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (dl.tv_nsec >= 1000000000L) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&e->hold_lock);
	e->hold_waiters++;
	while (!e->hold_on && rc == 0 && !__atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE))
		rc = pthread_cond_timedwait(&e->hold_cv, &e->hold_lock, &dl);
	if (e->hold_on && !__atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE))
		rc = 0;
	else if (rc == 0)
		rc = -ESRCH;
	else
		rc = -rc;
	if (rc) {
		__atomic_store_n(&e->hold_want, 0, __ATOMIC_RELEASE);
		uf_engine_kick(e);
	}
	/* (uf_engine_free waits for the last waiter to leave before the engine goes) */
	if (--e->hold_waiters == 0)
		pthread_cond_broadcast(&e->hold_cv);
	pthread_mutex_unlock(&e->hold_lock);
	return rc;
}

static void notify_python(uf_engine *e)
{
	if (e->pushed) {
		uint64_t one = 1;
		e->pushed = 0;
		if (write(e->notify_fd, &one, sizeof(one)) < 0) {
			/* the counter cannot overflow in practice; EAGAIN means already signalled */
		}
	}
}

static void *engine_thread(void *arg)
{
	uf_engine *e = arg;

	pthread_setname_np(pthread_self(), "uffdio-engine"); /* (top -H, ps -L, gdb) */
	while (!(e->stopping && e->inflight == 0)) {
		int r = io_uring_submit_and_wait(&e->ring, 1);
		if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
			report(e, r, 0, UF_FAIL_READ);
			notify_python(e);
			break;
		}
		process_cqes(e);
		notify_python(e);
	}
	io_uring_submit(&e->ring);
	return NULL;
}

/* ---- lifecycle -------------------------------------------------------------------- */

uf_engine *uf_engine_new(int uffd, unsigned int entries, unsigned int flags, int *err)
{
	uf_engine *e = calloc(1, sizeof(*e));
	int rc;

	*err = 0;
	if (!e) {
		*err = -ENOMEM;
		return NULL;
	}
	e->uffd = uffd;
	e->flags = (int)flags;
	e->stop_fd = e->notify_fd = e->kick_fd = -1;
	pthread_mutex_init(&e->rules_lock, NULL);
	pthread_mutex_init(&e->q_lock, NULL);
	pthread_mutex_init(&e->hold_lock, NULL);
	pthread_cond_init(&e->hold_cv, NULL);
	rc = io_uring_queue_init(entries ? entries : 256, &e->ring, 0);
	if (rc < 0)
		goto fail;
	e->ring_ok = 1;
	e->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	e->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	e->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (e->notify_fd < 0 || e->stop_fd < 0 || e->kick_fd < 0) {
		rc = -errno;
		goto fail;
	}
	/* posix_memalign, not aligned_alloc: C11 wants the size a multiple of the alignment */
	if (posix_memalign((void **)&e->rdbuf, UF_PAGE, BUFMSGS * sizeof(struct uf_msg))) {
		e->rdbuf = NULL;
		rc = -ENOMEM;
		goto fail;
	}
	if (!(flags & UF_ENGINE_NO_MULTISHOT)) {
		struct io_uring_buf_reg reg = { 0 };
		size_t i;
		e->br_size = (NBUFS * sizeof(struct io_uring_buf) + UF_PAGE - 1) & ~(UF_PAGE - 1);
		e->br = mmap(NULL, e->br_size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
		if (posix_memalign((void **)&e->bufs, UF_PAGE, NBUFS * BUFMSGS * sizeof(struct uf_msg)))
			e->bufs = NULL;
		if (e->br != MAP_FAILED && e->bufs) {
			io_uring_buf_ring_init(e->br);
			reg.ring_addr = (uint64_t)(uintptr_t)e->br;
			reg.ring_entries = NBUFS;
			reg.bgid = BGID;
			if (io_uring_register_buf_ring(&e->ring, &reg, 0) == 0) {
				for (i = 0; i < NBUFS; i++)
					io_uring_buf_ring_add(e->br, e->bufs + i * BUFMSGS * sizeof(struct uf_msg),
							      BUFMSGS * sizeof(struct uf_msg), (unsigned short)i,
							      io_uring_buf_ring_mask(NBUFS), (int)i);
				io_uring_buf_ring_advance(e->br, NBUFS);
				e->multishot = 1;
			}
		}
		if (e->br == MAP_FAILED)
			e->br = NULL;
	}
	e->st.multishot = (uint64_t)e->multishot;
	return e;
fail:
	*err = rc;
	uf_engine_free(e);
	return NULL;
}

int uf_engine_notify_fd(uf_engine *e)
{
	return e->notify_fd;
}

/* thread = 1: a C thread waits on the ring; 0: inline, the caller polls when the
 * eventfd fires.  An engine can be stopped and started again, in either mode:
 * deferred faults and records not yet taken by Python survive the restart. */
int uf_engine_start(uf_engine *e, int thread)
{
	int rc;

	if (e->started)
		return -EALREADY;
	if (!thread) {
		rc = io_uring_register_eventfd(&e->ring, e->notify_fd);
		if (rc < 0)
			return rc;
	}
	{
		uint64_t v;
		if (read(e->stop_fd, &v, sizeof(v)) < 0) {
			/* EAGAIN: no stop pending from an earlier run */
		}
	}
	e->thread_mode = thread;
	e->st.thread = (uint64_t)!!thread;
	e->stopping = 0;
	e->read_failed = 0;
	e->hold_want = e->hold_on = e->hold_cancel_sent = 0; /* (no hold outlives a run) */
	e->started = 1;
	rc = arm_read(e);
	if (rc < 0)
		return rc;
	arm_kick_poll(e);
	if (thread) {
		arm_stop_poll(e);
		rc = pthread_create(&e->thr, NULL, engine_thread, e);
		if (rc)
			return -rc;
		e->thread_started = 1;
		return 0;
	}
	rc = io_uring_submit(&e->ring);
	return rc < 0 ? rc : 0;
}

/* Inline mode: process whatever has completed, without blocking. */
int uf_engine_poll(uf_engine *e)
{
	int rc;

	if (e->thread_mode || !e->started)
		return 0;
	process_cqes(e);
	rc = io_uring_submit(&e->ring);
	e->pushed = 0;
	return rc < 0 ? rc : 0;
}

int uf_engine_stop(uf_engine *e)
{
	if (!e->started)
		return 0;
	if (e->thread_started) {
		uint64_t one = 1;
		if (write(e->stop_fd, &one, sizeof(one)) < 0)
			return -errno;
		pthread_join(e->thr, NULL);
		e->thread_started = 0;
	} else {
		begin_stop(e);
		while (e->inflight) {
			struct io_uring_cqe *cqe;
			int r = io_uring_submit_and_wait(&e->ring, 1);
			if (r < 0 && r != -EINTR && r != -EAGAIN)
				break;
			(void)cqe;
			process_cqes(e);
		}
	}
	if (!e->thread_mode)
		io_uring_unregister_eventfd(&e->ring);
	e->started = 0;
	return e->inflight ? -EBUSY : 0;
}

void uf_engine_get_stats(uf_engine *e, struct uf_engine_stats *out)
{
	uint64_t *dst = (uint64_t *)out, *src = (uint64_t *)&e->st;
	size_t i;

	for (i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void uf_engine_free(uf_engine *e)
{
	int i;

	if (!e)
		return;
	if (e->started)
		uf_engine_stop(e);
	/* a thread still in uf_engine_hold: the engine is stopped, it leaves with -ESRCH */
	pthread_mutex_lock(&e->hold_lock);
	__atomic_store_n(&e->stopping, 1, __ATOMIC_RELEASE);
	while (e->hold_waiters) {
		pthread_cond_broadcast(&e->hold_cv);
		pthread_cond_wait(&e->hold_cv, &e->hold_lock);
	}
	pthread_mutex_unlock(&e->hold_lock);
	if (e->ring_ok)
		io_uring_queue_exit(&e->ring);
	if (e->br)
		munmap(e->br, e->br_size);
	free(e->bufs);
	free(e->rdbuf);
	for (i = 0; i < NSLOTS; i++)
		free(e->slots[i].buf);
	for (i = 0; i < (int)e->nforks; i++) {
		free(e->forks[i].rules);
		if (e->forks[i].pt)
			uf_pt_unbind(e->forks[i].pt, e->uffd);
		uf_pt_unref(e->forks[i].pt);
	}
	if (e->pt)
		uf_pt_unbind(e->pt, e->uffd);
	uf_pt_unref(e->pt);
	free(e->swbuf);
	free(e->forks);
	free(e->rules);
	free(e->deferred);
	free(e->held);
	free(e->q);
	if (e->notify_fd >= 0)
		close(e->notify_fd);
	if (e->stop_fd >= 0)
		close(e->stop_fd);
	if (e->kick_fd >= 0)
		close(e->kick_fd);
	pthread_mutex_destroy(&e->rules_lock);
	pthread_mutex_destroy(&e->q_lock);
	pthread_mutex_destroy(&e->hold_lock);
	pthread_cond_destroy(&e->hold_cv);
	free(e);
}

/* ---- userspace swap ------------------------------------------------------------------ */

int uf_engine_set_pt(uf_engine *e, uf_pt *pt, int wp, uf_budget *budget)
{
	void *b = NULL;

	if (pt && !e->swbuf && posix_memalign(&b, UF_PAGE, (UF_RA_MAX + 1) * UF_PAGE))
		return -ENOMEM;
	pthread_mutex_lock(&e->rules_lock);
	if (b)
		e->swbuf = b;
	if (pt) {
		uf_pt_ref(pt);
		uf_pt_attach(pt, e->uffd, e->kick_fd, wp, budget);
	}
	if (e->pt)
		uf_pt_unref(e->pt);
	e->pt = pt;
	pthread_mutex_unlock(&e->rules_lock);
	/* its read becomes a poll (hold_step ends the armed read): a FORK that read takes
	 * meanwhile - a few microseconds at a process's connection - gets its copy of the
	 * table late, when the engine reaches it (a hold here would stall the caller, the
	 * event loop, and holds do not nest) */
	uf_engine_kick(e);
	return 0;
}

uf_pt *uf_engine_pt(uf_engine *e)
{
	uf_pt *pt;

	pthread_mutex_lock(&e->rules_lock);
	pt = e->pt ? uf_pt_ref(e->pt) : NULL;
	pthread_mutex_unlock(&e->rules_lock);
	return pt;
}

void uf_engine_kick(uf_engine *e)
{
	uint64_t one = 1;

	if (write(e->kick_fd, &one, sizeof(one)) < 0) {
		/* EAGAIN: a kick is pending already */
	}
}
