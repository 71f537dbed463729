// A real CometD server (npm cometd-nodejs-server) for tests/test_bayeux.py, plus a control API.
//
//   node server.js [port]     (port 0 or none: any free port)
//
// Prints one line on stdout, {"port": N}, once it listens on 127.0.0.1; nothing else goes to
// stdout.  Every path except /control/* is the Bayeux endpoint (the library accepts any path).
//
// Control API (JSON in, JSON out):
//   GET  /control/ping                              -> {"ok": true}
//   GET  /control/sessions                          -> [{"id", "subscriptions": [channel...]}]
//   GET  /control/log                               -> every Bayeux request: {n, tIn, tEnd, status,
//        messages (the request array), reply (the response array or null), dropped}
//        tIn / tEnd are performance.now() milliseconds: request received / response written.
//   POST /control/publish   {"channel", "data": [..], "to"?: clientId}
//        to a channel's subscribers, or (with "to") to one session, in one batch
//   POST /control/expire    {"clientId"}  forget the session as on expiry: the next connect gets
//        402::session_unknown (a held connect is answered first, so the client comes back now)
//   POST /control/advice    {"clientId", "advice": {...}}  merged into every successful
//        /meta/connect reply to that session from now on
//   POST /control/drop-next-reply {"clientId"}  the next /meta/connect response carrying messages
//        to that client is lost: the socket is destroyed instead of answered
//   POST /control/java-402  {"clientId"}  402 replies to that client read "402::Unknown client"
//        and carry no advice, as Java CometD words them
'use strict';

const http = require('http');
const {performance} = require('perf_hooks');
const {createCometDServer} = require('cometd-nodejs-server');
const {AcknowledgedMessagesExtension} = require('cometd-nodejs-server/ack-extension');

const port = Number(process.argv[2] || 0);
const cometd = createCometDServer({timeout: 2000, maxInterval: 10000});
cometd.addExtension(new AcknowledgedMessagesExtension());

const sessions = new Map();
cometd.addListener('sessionAdded', session => sessions.set(session.id, session));
cometd.addListener('sessionRemoved', session => sessions.delete(session.id));

const adviceOverrides = new Map();
const dropNext = new Set();
const java402 = new Set();
const log = [];

cometd.addExtension({
    outgoing: (cometd, sender, session, message, callback) => {
        if (message.channel === '/meta/connect' && message.successful && session && adviceOverrides.has(session.id)) {
            message.advice = Object.assign({}, message.advice || {}, adviceOverrides.get(session.id));
        }
        callback(undefined, message);
    }
});

function parse(text) {
    try {
        return JSON.parse(text);
    } catch (e) {
        return null;
    }
}

function bayeux(request, response, messages) {
    const entry = {n: log.length + 1, tIn: performance.now(), tEnd: null, status: null, messages, reply: null, dropped: false};
    log.push(entry);
    const clientId = messages.map(m => m && m.clientId).find(Boolean);
    const isConnect = messages.some(m => m && m.channel === '/meta/connect');
    const end = response.end.bind(response);
    response.end = (content, ...rest) => {
        let text = content === undefined || content === null ? '' : String(content);
        let reply = text ? parse(text) : null;
        if (clientId && java402.has(clientId) && Array.isArray(reply) && text.includes('402::')) {
            reply.forEach(m => {
                if (typeof m.error === 'string' && m.error.startsWith('402::')) {
                    m.error = '402::Unknown client';
                    delete m.advice;
                }
            });
            text = content = JSON.stringify(reply);
        }
        entry.tEnd = performance.now();
        entry.status = response.statusCode;
        entry.reply = reply;
        const carriesMessages = Array.isArray(reply) && reply.some(m => !String(m.channel).startsWith('/meta/'));
        if (isConnect && carriesMessages && dropNext.delete(clientId)) {
            entry.dropped = true;
            response.socket.destroy();
            return response;
        }
        return end(content, ...rest);
    };
    request.body = messages;
    cometd.handle(request, response);
}

function control(path, body, reply) {
    const session = body && body.clientId ? sessions.get(body.clientId) : undefined;
    switch (path) {
        case '/control/ping':
            return reply(200, {ok: true});
        case '/control/sessions':
            return reply(200, [...sessions.values()].map(s => ({id: s.id, subscriptions: s.subscriptions.map(c => c.name)})));
        case '/control/log':
            return reply(200, log);
        case '/control/publish': {
            const data = body.data || [];
            if (body.to) {
                const target = sessions.get(body.to);
                if (!target) {
                    return reply(404, {error: 'unknown session'});
                }
                target.batch(() => data.forEach(d => target.deliver(null, body.channel, d)));
            } else {
                const channel = cometd.createServerChannel(body.channel);
                data.forEach(d => channel.publish(null, d));
            }
            return reply(200, {published: data.length});
        }
        case '/control/expire':
            if (!session) {
                return reply(404, {error: 'unknown session'});
            }
            cometd._removeServerSession(session, true);
            if (session._scheduler) {
                session._scheduler.resume();
            }
            return reply(200, {expired: session.id});
        case '/control/advice':
            adviceOverrides.set(body.clientId, body.advice);
            if (session && session._scheduler) {
                session._scheduler.resume();  // answer the held connect now, with the new advice
            }
            return reply(200, {ok: true});
        case '/control/drop-next-reply':
            dropNext.add(body.clientId);
            return reply(200, {ok: true});
        case '/control/java-402':
            java402.add(body.clientId);
            return reply(200, {ok: true});
        default:
            return reply(404, {error: 'unknown control ' + path});
    }
}

const server = http.createServer((request, response) => {
    let content = '';
    request.setEncoding('utf8');
    request.on('data', chunk => {
        content += chunk;
    });
    request.on('end', () => {
        const path = request.url.split('?')[0];
        if (path.startsWith('/control/')) {
            control(path, content ? parse(content) : null, (status, value) => {
                response.writeHead(status, {'Content-Type': 'application/json'});
                response.end(JSON.stringify(value));
            });
            return;
        }
        const messages = parse(content);
        if (!Array.isArray(messages)) {
            response.statusCode = 400;
            response.end();
            return;
        }
        bayeux(request, response, messages);
    });
});

server.listen(port, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({port: server.address().port}) + '\n');
});

function shutdown() {
    cometd.close();
    server.close();
    process.exit(0);
}

process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
