"""The test internet of tests/sdk/run-network.sh: HTTP, HTTPS and DNS servers on made-up
addresses inside the `fkt-inet` namespace, and a DNS query for checking them.

    netlab.py serve --http 203.0.113.10:80=allowed --https 203.0.113.10:443=allowed \
        --cert c.pem --key k.pem --dns 203.0.113.53:53 --record allowed.test=203.0.113.10
    netlab.py query 203.0.113.53:53 allowed.test      # prints the A answers, one a line

Every HTTP(S) server answers any GET with its own name and a newline. The DNS server answers
A queries for its records (TTL 30 s), NOERROR without answers for their other types, and
NXDOMAIN for every other name, over UDP and TCP.
"""

import argparse
import http.server
import ssl
import sys
import threading

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def addr(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


def named(s: str) -> tuple[tuple[str, int], str]:
    where, name = s.split("=", 1)
    return addr(where), name


def http_server(where: tuple[str, int], name: str, tls: ssl.SSLContext | None):
    body = f"{name}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(where, Handler)
    if tls:
        # The handshake happens in the handler's thread: a stalled client stalls only itself.
        srv.socket = tls.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


class Zone(BaseResolver):
    def __init__(self, records: dict[str, str]):
        self.records = records

    def resolve(self, request, handler):
        reply = request.reply()
        q = request.q
        name = str(q.qname).rstrip(".").lower()
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        elif q.qtype == QTYPE.A:
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(self.records[name]), ttl=30))
        return reply


def serve(args) -> None:
    tls = None
    if args.https:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    for where, name in map(named, args.http):
        http_server(where, name, None)
    for where, name in map(named, args.https):
        http_server(where, name, tls)
    records = {}
    for r in args.record:
        n, ip = r.split("=", 1)
        records[n.lower()] = ip
    quiet = DNSLogger(logf=lambda _: None)
    host, port = addr(args.dns)
    for tcp in (False, True):
        DNSServer(Zone(records), address=host, port=port, tcp=tcp, logger=quiet).start_thread()
    print("netlab ready", flush=True)
    threading.Event().wait()


def query(args) -> int:
    host, port = addr(args.server)
    reply = DNSRecord.parse(DNSRecord.question(args.name).send(host, port, timeout=3))
    for rr in reply.rr:
        if rr.rtype == QTYPE.A:
            print(rr.rdata)
    return 0 if reply.header.rcode == RCODE.NOERROR else 1


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--http", action="append", default=[], metavar="IP:PORT=NAME")
    s.add_argument("--https", action="append", default=[], metavar="IP:PORT=NAME")
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--dns", required=True, metavar="IP:PORT")
    s.add_argument("--record", action="append", default=[], metavar="NAME=IP")
    q = sub.add_parser("query")
    q.add_argument("server", metavar="IP:PORT")
    q.add_argument("name")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
        return 0
    return query(args)


if __name__ == "__main__":
    sys.exit(main())
