/*
 * agent_proto.h - the wire protocol between the uffdio agent (in the target)
 * and the manager.  src/uffdio/_agentproto.py mirrors these numbers; change
 * both together and bump UF_AGENT_VERSION.
 *
 * Transport: a UNIX SOCK_SEQPACKET connection (message boundaries kept, so
 * every message is one header plus n u64 words, at most UF_AGENT_MAXWORDS).
 * A userfaultfd travels with HELLO (agent -> manager) or GIVE_UFFD (manager ->
 * agent) as SCM_RIGHTS.
 */
#ifndef UFFDIO_AGENT_PROTO_H
#define UFFDIO_AGENT_PROTO_H
#include <stdint.h>

#define UF_AGENT_VERSION 2 /* 2: MOVE takes a scratch range to empty after its reply */
#define UF_AGENT_MAXWORDS 8192 /* 64 KiB of payload per message */
#define UF_AGENT_ENV_SOCK "UFFDIO_AGENT_SOCK"

struct uf_agent_hdr {
	uint32_t type;
	uint32_t flags;
	uint64_t seq;  /* request number; a REPLY carries the request's seq */
	int64_t a, b, c;
	uint64_t n;    /* number of u64 payload words that follow */
};

enum uf_agent_type {
	/* agent -> manager */
	UF_A_HELLO = 1,    /* a=pid b=ppid c=uffd features (or -errno if no uffd)
			    * payload: version, scratch start, scratch len, agent region start, len,
			    * number of KEPT messages that follow */
	UF_A_REPLY = 2,    /* a = result (>= 0 or -errno), payload per request */
	UF_A_FORKED = 3,   /* a = child pid, sent by the parent after fork() returned */
	UF_A_FENCE = 4,    /* a fork without EVENT_FORK is about to happen: swap everything
			    * back in and stop evicting; the manager answers with REPLY */
	UF_A_FENCE_END = 5,/* the fork is over: eviction may resume */
	UF_A_KEPT = 6,     /* after a RECONNECT HELLO, one per kept fd: a = tag, fd attached */
	UF_A_RELEASE = 7,  /* uffdio_agent_stop(): bring everything back, then send DETACH */
	UF_A_THREAD = 9,   /* the agent thread started: a = its tid (the manager never makes it
			    * wait at the memory limit: it must stay free to evict) */
	UF_A_YIELD = 8,    /* the program registers [a, a+b) with its own uffd: bring its
			    * pages back and forget them; answered with FENCE_ACK */

	/* manager -> agent */
	UF_M_WELCOME = 16, /* manager is serving the uffd; a = 1 if it is a resumed session */
	UF_M_SCAN = 17,    /* register new anonymous mappings; REPLY payload = (start, len)... */
	UF_M_MOVE = 18,    /* payload (src, dst, len)...: UFFDIO_MOVE each run to the scratch;
			    * REPLY payload = (src, len) pairs actually moved, a = pages skipped.
			    * b, c (version 2): a scratch range [b, b+c) to madvise DONTNEED after
			    * the reply is sent - the previous batch's half of the scratch area,
			    * emptied while the manager reads this batch's half */
	UF_M_DONTNEED = 19,/* payload (start, len)...: madvise DONTNEED (scratch only) */
	UF_M_DETACH = 20,  /* unregister everything, close the uffd, stop the agent thread */
	UF_M_GIVE_UFFD = 21,/* the uffd of this (forked) process, to keep as a duplicate */
	UF_M_PING = 22,
	UF_M_FENCE_ACK = 23,/* answer to UF_A_FENCE (seq matches); a = result */
	UF_M_KEEP_FD = 24  /* keep this fd under tag a (replacing one with the same tag; no fd:
			    * drop the tag) and give it back to the next manager after a
			    * reconnect: the manager's store outlives the manager */
};

/* KEEP_FD tags the agent knows of (the others it keeps without looking) */
#define UF_KEEP_SWAP_TABLE 3

enum uf_agent_flags {
	UF_AF_FORKED = 1,      /* HELLO from a child created by fork() */
	UF_AF_HAS_UFFD = 2,    /* HELLO carries the process's uffd */
	UF_AF_EVENT_FORK = 4,  /* the uffd has EVENT_FORK (children are registered by the kernel) */
	UF_AF_RECONNECT = 8,   /* HELLO after the manager went away: same uffd, same mm */
	UF_AF_USER_MODE = 16,  /* the uffd was opened with UFFD_USER_MODE_ONLY */
	UF_AF_TABLE_LOST = 32  /* RECONNECT of a fork child whose swap page table (a copy of
				* its parent's, pages evicted included) never reached it */
};

#endif
