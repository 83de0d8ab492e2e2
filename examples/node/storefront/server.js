// Storefront: the entry point of the example shop. Node's own http module, no npm packages and
// no ebpf-bridge code at all.
//
//   GET /checkout/<id>   headers X-Tenant-ID, X-User-ID
//     -> calls orders GET /orders/<id> over HTTP/1.1 (keep-alive), forwarding those headers,
//        and answers {"checkout": id, "order": <orders' answer>}
//
//   node server.js --port 8080 --orders http://127.0.0.1:8081 [--ready-file PATH]
'use strict';

const fs = require('fs');
const http = require('http');

function parseArgs(argv) {
  const args = { port: 8080, orders: 'http://127.0.0.1:8081', readyFile: null };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[++i];
    if (flag === '--port') args.port = Number(value);
    else if (flag === '--orders') args.orders = value;
    else if (flag === '--ready-file') args.readyFile = value;
    else {
      console.error('usage: server.js [--port N] [--orders URL] [--ready-file PATH]');
      process.exit(2);
    }
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const orders = new URL(args.orders);
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
const FORWARDED = ['x-tenant-id', 'x-user-id'];

function reply(res, status, body) {
  const raw = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(raw) });
  res.end(raw);
}

function checkout(req, res, id) {
  const headers = {};
  for (const h of FORWARDED) if (req.headers[h]) headers[h] = req.headers[h];
  const call = http.get({
    host: orders.hostname, port: orders.port, path: `/orders/${encodeURIComponent(id)}`,
    headers, agent, timeout: 10000,
  }, (up) => {
    const chunks = [];
    up.on('data', (c) => chunks.push(c));
    up.on('end', () => {
      let order;
      try { order = JSON.parse(Buffer.concat(chunks).toString()); } catch { order = null; }
      reply(res, up.statusCode === 200 ? 200 : 502, { checkout: id, order });
    });
  });
  call.on('timeout', () => call.destroy(new Error('orders timed out')));
  call.on('error', (e) => reply(res, 503, { error: `orders unreachable: ${e.message}` }));
}

const server = http.createServer((req, res) => {
  const m = /^\/checkout\/([^/?]+)/.exec(req.url);
  if (req.method !== 'GET' || !m) return reply(res, 404, { error: 'not found' });
  checkout(req, res, decodeURIComponent(m[1]));
});
server.keepAliveTimeout = 30000;

server.listen(args.port, '127.0.0.1', () => {
  if (args.readyFile) {
    // Write then rename, so a watcher never reads a half-written file.
    fs.writeFileSync(`${args.readyFile}.tmp`, String(server.address().port));
    fs.renameSync(`${args.readyFile}.tmp`, args.readyFile);
  }
});

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { server.close(); process.exit(0); });
