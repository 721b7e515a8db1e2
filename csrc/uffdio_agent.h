/*
 * uffdio_agent.h - the uffdio agent, for C programs that link it explicitly.
 *
 * Most programs get the agent with LD_PRELOAD (uffdio run / uffdio.spawn set
 * it up); its constructor connects to $UFFDIO_AGENT_SOCK.  A program that
 * wants to be managed without LD_PRELOAD links libuffdio_agent (the file
 * printed by `python -m uffdio agent-path`) and calls uffdio_agent_start().
 */
#ifndef UFFDIO_AGENT_H
#define UFFDIO_AGENT_H
#ifdef __cplusplus
extern "C" {
#endif

/* Connect to the manager listening on sock_path, hand it this process's
 * userfaultfd, register the private anonymous mappings and start the agent
 * thread.  Returns 0, or -errno (-EALREADY if the agent already runs,
 * -ECONNREFUSED/-ENOENT if no manager listens there, -EPERM if this process
 * may not use userfaultfd transparently). */
int uffdio_agent_start(const char *sock_path);

/* Give the process back: unregister everything (every page the manager
 * evicted is brought back first by the manager), close the uffd, stop the
 * agent thread.  Returns 0 or -errno. */
int uffdio_agent_stop(void);

#ifdef __cplusplus
}
#endif
#endif
