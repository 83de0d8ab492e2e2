// Zero-code Node front: GET /front/:id -> GET <upstream>/relay/:id over a keep-alive agent.
// Writes its port to the ready file (tmp + rename). No tracing code, no traceparent forwarding.
'use strict';
const http = require('http');
const fs = require('fs');
const [upstream, readyFile] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: 2 });
const server = http.createServer((req, res) => {
  const id = req.url.split('/').pop();
  http.get(`${upstream}/relay/${id}`, { agent }, (up) => {
    let body = '';
    up.on('data', (c) => { body += c; });
    up.on('end', () => {
      res.writeHead(up.statusCode, { 'content-type': 'application/json' });
      res.end(body);
    });
  }).on('error', (e) => { res.writeHead(502); res.end(String(e)); });
});
server.keepAliveTimeout = 30000;
server.listen(0, '127.0.0.1', () => {
  fs.writeFileSync(readyFile + '.tmp', String(server.address().port));
  fs.renameSync(readyFile + '.tmp', readyFile);
});
