/* The pod sandbox's process: it holds the pod's namespaces and does nothing else until the
 * runtime asks it to stop. Built static, so its image needs no other file. */
#include <signal.h>
#include <unistd.h>

static void stop(int signo) {
    (void)signo;
    _exit(0);
}

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) {
        pause();
    }
}
