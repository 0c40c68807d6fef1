"""Real clients and servers for the mesh's traffic tests (Debian's python3-grpcio and
python3-websockets). Each server prints the port it bound, then serves until killed; each client
prints one result line and exits 0, or prints what went wrong and exits 1.

  traffic.py grpc-server HOST              bidirectional echo: ping-N -> pong-N
  traffic.py grpc-pingpong TARGET N        sends ping-n+1 only after pong-n arrived
  traffic.py grpc-unary TARGET N           N unary calls; prints the count of each status code
  traffic.py ws-server HOST TAG            a page on /, a WebSocket echo on any other path
  traffic.py ws-client URL N               N messages, each answered before the next
  traffic.py tcp-hold HOST:PORT N SECS     opens N TCP connections at once; after SECS prints
                                           {"connected":C,"waiting":W,"refused":R}, closes the
                                           W still connecting and holds the C until stdin closes
"""
import asyncio
import http
import os
import queue
import sys
from concurrent import futures

# The port servers bind: 0 (any) unless TRAFFIC_PORT says which.
PORT = int(os.environ.get("TRAFFIC_PORT", "0"))


def grpc_server(host):
    import grpc

    def chat(requests, context):
        for message in requests:
            yield message.replace(b"ping", b"pong")

    def echo(request, context):
        return request

    handler = grpc.method_handlers_generic_handler(
        "demo.Echo",
        {
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:{PORT}")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def grpc_pingpong(target, n):
    import grpc

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    chat = channel.stream_stream("/demo.Echo/Chat")
    replies = queue.Queue()

    def pings():
        for i in range(n):
            yield f"ping-{i}".encode()
            # The next message waits for this one's reply, as a ping-pong protocol does.
            replies.get(timeout=10)

    got = 0
    try:
        for reply in chat(pings(), timeout=30):
            if reply != f"pong-{got}".encode():
                print(f"reply {got} was {reply!r}")
                return 1
            got += 1
            replies.put(None)
    except grpc.RpcError as e:
        print(f"replies {got} then {e.code()}: {e.details()}")
        return 1
    print(f"replies {got}")
    return 0 if got == n else 1


def grpc_unary(target, n):
    import grpc

    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    echo = channel.unary_unary("/demo.Echo/Echo")
    counts = {}
    for i in range(n):
        try:
            echo(f"hello-{i}".encode(), timeout=10)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        counts[code] = counts.get(code, 0) + 1
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


async def ws_server(host, tag):
    import websockets

    async def echo(ws):
        async for message in ws:
            await ws.send(f"{tag}:{ws.path}:{message}")

    async def page(path, headers):
        if path == "/":
            return http.HTTPStatus.OK, [("content-type", "text/html")], f"<h1>{tag}</h1>\n".encode()
        return None

    async with websockets.serve(echo, host, PORT, process_request=page) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


async def ws_client(url, n):
    import websockets

    try:
        async with websockets.connect(url, open_timeout=10) as ws:
            last = ""
            for i in range(n):
                await ws.send(f"m{i}")
                last = await asyncio.wait_for(ws.recv(), 10)
                if not last.endswith(f":m{i}"):
                    print(f"answer {i} was {last!r}")
                    return 1
            print(f"echoed {n} {last.rsplit(':', 1)[0]}")
            return 0
    except websockets.exceptions.InvalidStatusCode as e:
        print(f"status {e.status_code}")
        return 1


def tcp_hold(target, n, secs):
    """A flood of connections held by its own process, so that its descriptors count against
    this process's limit and not the test's (a process may hold at most `ulimit -Hn`)."""
    import errno
    import json
    import selectors
    import socket
    import time

    host, port = target.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    connecting, connected, refused = set(), [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, int(port)))
        if err == 0:
            connected.append(s)
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            sel.register(s, selectors.EVENT_WRITE)
            connecting.add(s)
        else:
            refused += 1
            s.close()
    deadline = time.monotonic() + secs
    while connecting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, _ in sel.select(left):
            s = key.fileobj
            sel.unregister(s)
            connecting.discard(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(s)
            else:
                refused += 1
                s.close()
    waiting = len(connecting)
    for s in connecting:
        s.close()
    print(json.dumps({"connected": len(connected), "waiting": waiting, "refused": refused}), flush=True)
    sys.stdin.read()
    for s in connected:
        s.close()
    return 0


def main(argv):
    cmd = argv[1]
    if cmd == "grpc-server":
        grpc_server(argv[2])
    elif cmd == "grpc-pingpong":
        return grpc_pingpong(argv[2], int(argv[3]))
    elif cmd == "grpc-unary":
        return grpc_unary(argv[2], int(argv[3]))
    elif cmd == "ws-server":
        asyncio.run(ws_server(argv[2], argv[3]))
    elif cmd == "ws-client":
        return asyncio.run(ws_client(argv[2], int(argv[3])))
    elif cmd == "tcp-hold":
        return tcp_hold(argv[2], int(argv[3]), float(argv[4]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
