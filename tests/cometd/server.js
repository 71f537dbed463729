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
//
// Users (GWS style: notifications belong to a user, whatever session reads them).  A session's
// user is the HTTP Basic login of its handshake request.
//   POST /control/publish   {"channel", "data": [..], "user": name}  kept for that user until a
//        session of that user acknowledges it (ack extension); delivered to the user's
//        subscribed sessions now, and to each session of that user when it subscribes
//        (so a new session gets what no session acknowledged: at least once per user)
//   GET  /control/users     -> {name: {"sessions": [clientId...], "pending": [data...],
//        "acked": [data...]}}  (acked: in the order acknowledged)
//   POST /control/csrf      {"enabled": bool}  -> {"token"}  with CSRF on, `GET /api/v2/me`
//        answers 200 with headers X-CSRF-HEADER: X-CSRF-TOKEN and X-CSRF-TOKEN: <token>, and a
//        Bayeux request without that token gets HTTP 403 "Missing or invalid Csrf token";
//        each call makes a new token (the old one is refused from then on).  With CSRF off,
//        `GET /api/v2/me` answers 404, as a server without that resource.
//   GET  /control/csrf      -> {"enabled", "token", "fetches": GETs of /api/v2/me, "refused": 403s}
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

const sessionUser = new Map();   // clientId -> Basic login of its handshake
const users = new Map();         // login -> {pending: [{key, data, channel}], acked: [data]}
const sentBatches = new Map();   // clientId -> [{batch, keys}] user messages per connect reply
const csrf = {enabled: false, token: null, fetches: 0, refused: 0};

function userState(name) {
    if (!users.has(name)) {
        users.set(name, {pending: [], acked: []});
    }
    return users.get(name);
}

function basicLogin(request) {
    const header = request.headers.authorization || '';
    if (!header.startsWith('Basic ')) {
        return null;
    }
    const decoded = Buffer.from(header.slice(6), 'base64').toString('utf8');
    return decoded.split(':')[0];
}

function acknowledge(clientId, ack) {
    const user = sessionUser.get(clientId);
    const batches = sentBatches.get(clientId) || [];
    if (!user) {
        return;
    }
    const state = userState(user);
    const keys = new Set();
    sentBatches.set(clientId, batches.filter(b => {
        if (b.batch <= ack) {
            b.keys.forEach(k => keys.add(k));
            return false;
        }
        return true;
    }));
    state.pending = state.pending.filter(p => {
        if (keys.has(p.key)) {
            state.acked.push(p.data);
            return false;
        }
        return true;
    });
}

cometd.addListener('subscribed', (channel, session) => {
    const user = sessionUser.get(session.id);
    const pending = user ? userState(user).pending.filter(p => p.channel === channel.name) : [];
    if (pending.length) {
        session.batch(() => pending.forEach(p => session.deliver(null, p.channel, p.data)));
    }
});

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
    const login = basicLogin(request);
    if (csrf.enabled && request.headers['x-csrf-token'] !== csrf.token) {
        csrf.refused += 1;
        entry.tEnd = performance.now();
        entry.status = 403;
        response.writeHead(403, {'Content-Type': 'text/plain'});
        response.end('Missing or invalid Csrf token');
        return;
    }
    messages.forEach(m => {
        if (m && m.channel === '/meta/connect' && m.ext && typeof m.ext.ack === 'number') {
            acknowledge(m.clientId, m.ext.ack);
        }
    });
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
        if (Array.isArray(reply)) {
            reply.forEach(m => {
                if (m.channel === '/meta/handshake' && m.successful && m.clientId && login) {
                    sessionUser.set(m.clientId, login);
                }
            });
            const connect = reply.find(m => m.channel === '/meta/connect');
            const user = clientId && sessionUser.get(clientId);
            if (user && connect && connect.ext && typeof connect.ext.ack === 'number') {
                const pendingKeys = new Set(userState(user).pending.map(p => p.key));
                const keys = reply.filter(m => !String(m.channel).startsWith('/meta/'))
                    .map(m => JSON.stringify(m.data)).filter(k => pendingKeys.has(k));
                if (keys.length) {
                    if (!sentBatches.has(clientId)) {
                        sentBatches.set(clientId, []);
                    }
                    sentBatches.get(clientId).push({batch: connect.ext.ack, keys});
                }
            }
        }
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
            if (body.user) {
                const state = userState(body.user);
                data.forEach(d => state.pending.push({key: JSON.stringify(d), data: d, channel: body.channel}));
                for (const target of sessions.values()) {
                    if (sessionUser.get(target.id) === body.user
                        && target.subscriptions.some(c => c.name === body.channel)) {
                        target.batch(() => data.forEach(d => target.deliver(null, body.channel, d)));
                    }
                }
            } else if (body.to) {
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
        case '/control/users': {
            const result = {};
            for (const [name, state] of users) {
                result[name] = {sessions: [], pending: state.pending.map(p => p.data), acked: state.acked};
            }
            for (const [id, name] of sessionUser) {
                if (sessions.has(id)) {
                    if (!result[name]) {
                        result[name] = {sessions: [], pending: [], acked: []};
                    }
                    result[name].sessions.push(id);
                }
            }
            return reply(200, result);
        }
        case '/control/csrf':
            if (body) {
                csrf.enabled = Boolean(body.enabled);
                csrf.token = csrf.enabled ? require('crypto').randomBytes(12).toString('hex') : null;
            }
            return reply(200, csrf);
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
        if (request.method === 'GET' && path === '/api/v2/me') {
            if (!csrf.enabled) {
                response.writeHead(404, {'Content-Type': 'application/json'});
                response.end(JSON.stringify({statusCode: 404}));
                return;
            }
            csrf.fetches += 1;
            response.writeHead(200, {'Content-Type': 'application/json', 'X-CSRF-HEADER': 'X-CSRF-TOKEN',
                                     'X-CSRF-TOKEN': csrf.token});
            response.end(JSON.stringify({statusCode: 0, user: {userName: basicLogin(request)}}));
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
