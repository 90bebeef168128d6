/* netbench: the small TCP load generator of Stockade's benchmarks.
 *
 * Python cannot drive request/response or connection rates fast enough to see a
 * datapath's cost (its own per-call overhead is tens of microseconds), so the
 * benchmarks compile this once (gcc -O2 -static) and run it inside the namespaces
 * and containers they create.
 *
 *   netbench server PORT                 echo server: SO_REUSEPORT, one epoll loop per CPU;
 *                                        echoes what it reads, closes on EOF
 *   netbench rr HOST PORT SECONDS        one persistent connection, 1-byte request and
 *                                        reply in a loop -> {"transactions", "rate"}
 *   netbench crr HOST PORT SECONDS W     W processes each: connect, 1-byte request,
 *                                        reply, close -> {"connections", "rate",
 *                                        "p50_us", "p99_us", "errors"}
 *   netbench probe HOST PORT TIMEOUT_S   connect with a 5 ms SYN timeout until one
 *                                        request/reply succeeds; prints the
 *                                        CLOCK_MONOTONIC time of success in ns
 *                                        (exit 1 on timeout)
 *
 * Every result is one JSON line on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_LAT (4 * 1024 * 1024)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static struct sockaddr_in addr_of(const char *host, int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "bad IPv4 address %s\n", host);
		exit(2);
	}
	return a;
}

static void serve_loop(int port)
{
	int one = 1, ep = epoll_create1(0);
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	struct epoll_event ev = {.events = EPOLLIN}, evs[256];
	char buf[4096];

	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 4096)) {
		perror("bind/listen");
		exit(2);
	}
	ev.data.fd = ls;
	epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == ls) {
				int c;
				while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));
			if (r > 0) {
				if (write(fd, buf, r) < 0)
					close(fd);
			} else if (r == 0 || errno != EAGAIN) {
				close(fd);
			}
		}
	}
}

static int cmd_server(int port)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	signal(SIGCHLD, SIG_IGN);
	for (long i = 1; i < cpus; i++)
		if (fork() == 0)
			serve_loop(port);
	serve_loop(port);
	return 0;
}

static int cmd_rr(const char *host, int port, double secs)
{
	struct sockaddr_in a = addr_of(host, port);
	int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
	char c = 'x';
	uint64_t n = 0, t0, end;

	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(s, (void *)&a, sizeof(a))) {
		perror("connect");
		return 1;
	}
	t0 = now_ns();
	end = t0 + (uint64_t)(secs * 1e9);
	while (1) {
		if (write(s, &c, 1) != 1 || read(s, &c, 1) != 1) {
			perror("rr");
			return 1;
		}
		n++;
		if ((n & 63) == 0 && now_ns() >= end)
			break;
	}
	printf("{\"transactions\": %llu, \"rate\": %.1f}\n", (unsigned long long)n,
	       n / ((now_ns() - t0) / 1e9));
	return 0;
}

/* One short connection; returns its latency in us, or -1. */
static long one_conn(const struct sockaddr_in *a)
{
	uint64_t t = now_ns();
	int s = socket(AF_INET, SOCK_STREAM, 0);
	char c = 'x';
	long r = -1;

	if (connect(s, (void *)a, sizeof(*a)) == 0 && write(s, &c, 1) == 1 && read(s, &c, 1) == 1)
		r = (long)((now_ns() - t) / 1000);
	close(s);
	return r;
}

static int cmp_u32(const void *x, const void *y)
{
	uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
	return a < b ? -1 : a > b;
}

static int cmd_crr(const char *host, int port, double secs, int workers)
{
	struct sockaddr_in a = addr_of(host, port);
	uint32_t *lat = malloc(sizeof(uint32_t) * MAX_LAT);
	size_t total = 0;
	uint64_t errors = 0, t0 = now_ns();
	int pipes[64][2];

	if (workers < 1 || workers > 64)
		return 2;
	for (int w = 0; w < workers; w++) {
		if (pipe(pipes[w]))
			return 2;
		if (fork() == 0) {
			uint64_t end = now_ns() + (uint64_t)(secs * 1e9), n = 0, err = 0;
			uint32_t *mine = malloc(sizeof(uint32_t) * (MAX_LAT / workers));
			close(pipes[w][0]);
			while (now_ns() < end && n < MAX_LAT / workers) {
				long l = one_conn(&a);
				if (l < 0)
					err++;
				else
					mine[n++] = (uint32_t)l;
			}
			if (write(pipes[w][1], &err, 8) != 8 || write(pipes[w][1], &n, 8) != 8)
				_exit(1);
			for (size_t off = 0; off < n * 4;) {
				ssize_t k = write(pipes[w][1], (char *)mine + off, n * 4 - off);
				if (k <= 0)
					_exit(1);
				off += k;
			}
			_exit(0);
		}
		close(pipes[w][1]);
	}
	for (int w = 0; w < workers; w++) {
		uint64_t err = 0, n = 0;
		if (read(pipes[w][0], &err, 8) != 8 || read(pipes[w][0], &n, 8) != 8)
			return 1;
		for (size_t off = 0; off < n * 4;) {
			ssize_t k = read(pipes[w][0], (char *)(lat + total) + off, n * 4 - off);
			if (k <= 0)
				return 1;
			off += k;
		}
		total += n;
		errors += err;
		close(pipes[w][0]);
	}
	while (wait(NULL) > 0)
		;
	double el = (now_ns() - t0) / 1e9;
	qsort(lat, total, sizeof(uint32_t), cmp_u32);
	printf("{\"connections\": %zu, \"rate\": %.1f, \"p50_us\": %u, \"p99_us\": %u, \"errors\": %llu}\n",
	       total, total / el, total ? lat[total / 2] : 0, total ? lat[total * 99 / 100] : 0,
	       (unsigned long long)errors);
	return 0;
}

/* Non-blocking connect that gives up after 5 ms (a dropped SYN would otherwise
 * wait for the kernel's 1 s retransmission and hide the real readiness time). */
static int try_once(const struct sockaddr_in *a)
{
	int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct pollfd p = {.fd = s, .events = POLLOUT};
	int ok = 0, err = 0;
	socklen_t len = sizeof(err);
	char c = 'x';

	if (connect(s, (void *)a, sizeof(*a)) == 0 || errno == EINPROGRESS) {
		if (poll(&p, 1, 5) == 1 && getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && !err) {
			p.events = POLLIN;
			if (write(s, &c, 1) == 1 && poll(&p, 1, 50) == 1 && read(s, &c, 1) == 1)
				ok = 1;
		}
	}
	close(s);
	return ok;
}

static int cmd_probe(const char *host, int port, double timeout)
{
	struct sockaddr_in a = addr_of(host, port);
	uint64_t end = now_ns() + (uint64_t)(timeout * 1e9);
	unsigned tries = 0;

	while (now_ns() < end) {
		tries++;
		if (try_once(&a)) {
			printf("{\"ok_ns\": %llu, \"tries\": %u}\n", (unsigned long long)now_ns(), tries);
			return 0;
		}
		usleep(1000);
	}
	printf("{\"ok_ns\": null, \"tries\": %u}\n", tries);
	return 1;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[1], "server"))
		return cmd_server(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "rr"))
		return cmd_rr(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc == 6 && !strcmp(argv[1], "crr"))
		return cmd_crr(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
	if (argc == 5 && !strcmp(argv[1], "probe"))
		return cmd_probe(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: netbench server PORT | rr HOST PORT S | crr HOST PORT S W | probe HOST PORT S\n");
	return 2;
}
