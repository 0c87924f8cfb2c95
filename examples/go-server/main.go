// Command go-server is an HTTP server that knows nothing of sticky-cluster: it takes its listener the
// systemd way (sd_listen_fds(3): LISTEN_PID names this process, LISTEN_FDS counts the fds from 3), as
// coreos/go-systemd's activation.Listeners does, with the standard library alone. Behind
// `sticky-cluster --routing kernel --protocol none` every client always reaches the same one of them.
//
// Each request is answered with one JSON line: the worker index (from STICKY_CLUSTER_WORKER_INDEX),
// the pid, and the client address as Go sees it. SIGTERM stops accepting, finishes the requests in
// flight and exits 0.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// listenFdsStart is the first inherited fd (SD_LISTEN_FDS_START).
const listenFdsStart = 3

// activatedListeners returns the listeners this process was given, and unsets the variables so that
// children do not take them for theirs.
func activatedListeners() ([]net.Listener, error) {
	defer os.Unsetenv("LISTEN_PID")
	defer os.Unsetenv("LISTEN_FDS")
	defer os.Unsetenv("LISTEN_FDNAMES")
	if pid, err := strconv.Atoi(os.Getenv("LISTEN_PID")); err != nil || pid != os.Getpid() {
		return nil, fmt.Errorf("LISTEN_PID is %q, not this process (%d): no listener was passed", os.Getenv("LISTEN_PID"), os.Getpid())
	}
	count, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || count < 1 {
		return nil, fmt.Errorf("LISTEN_FDS is %q: no listener was passed", os.Getenv("LISTEN_FDS"))
	}
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	listeners := make([]net.Listener, 0, count)
	for i := 0; i < count; i++ {
		fd := listenFdsStart + i
		syscall.CloseOnExec(fd)
		name := "LISTEN_FD_" + strconv.Itoa(fd)
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
		file := os.NewFile(uintptr(fd), name)
		listener, err := net.FileListener(file)
		file.Close() // FileListener holds its own duplicate
		if err != nil {
			return nil, fmt.Errorf("fd %d (%s): %v", fd, name, err)
		}
		listeners = append(listeners, listener)
	}
	return listeners, nil
}

func main() {
	listeners, err := activatedListeners()
	if err != nil {
		fmt.Fprintln(os.Stderr, "go-server:", err)
		os.Exit(2)
	}
	index, _ := strconv.Atoi(os.Getenv("STICKY_CLUSTER_WORKER_INDEX"))
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"worker": index, "pid": os.Getpid(), "remote": host})
	})
	server := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, len(listeners))
	for _, listener := range listeners {
		go func(listener net.Listener) { served <- server.Serve(listener) }(listener)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := server.Shutdown(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "go-server: shutdown:", err)
			os.Exit(1)
		}
	case err := <-served:
		if !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintln(os.Stderr, "go-server:", err)
			os.Exit(1)
		}
	}
}
