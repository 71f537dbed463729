// A faithful test double of the CometD server behind Genesys Web Services (GWS 8.5 runs the Java
// CometD 3.1.x server), built on npm `cometd-nodejs-server` (the CometD project's own Node
// server), plus the few GWS REST resources the store's clients use and a control API for tests.
//
//   node server.js [port] [--timeout MS] [--max-interval MS] [--tls CERT_PEM KEY_PEM]
//
// port 0 or none: any free port; --timeout (default 2000) is how long a /meta/connect is held,
// --max-interval (default 10000) how long a session lives without a /meta/connect; --tls
// serves https with that certificate chain and key.  Listens on 127.0.0.1 and prints one line on
// stdout, {"port": N}, once listening; nothing else goes to stdout.
//
// Paths under /control/ are the control API; GET /api/v2/... are GWS resources; every other
// path is the Bayeux endpoint (the library accepts any path; it answers 400 to anything but a
// POST of a JSON array).
//
// ------------------------------------------------------------------------------------------------
// What the double does, and which real server behaviour each part copies (sources: the Java
// CometD server 3.1.9, cometd-java/cometd-java-server/src/main/java/org/cometd/server/..., and
// npm cometd-nodejs-server 1.2.1, cometd-nodejs-server.js and ack-extension.js):
//
// * Bayeux long-polling, all of it the library's own code (createCometDServer, HTTPTransport):
//   handshake alone in its request (else HTTP 500, "protocol violation" in _processMessages),
//   one held /meta/connect per session for `timeout` ms (Java: AbstractHttpTransport
//   .handleMetaConnect / AbstractServerTransport "timeout"; Java's default is 30000 ms, the
//   double's 2000 keeps tests fast), advice {reconnect: retry, interval: 0, timeout} on handshake
//   and held connects (_advise).
// * Session expiry: a session that sends no /meta/connect within interval + maxInterval after a
//   reply is removed by the sweeper, together with its queue (cometd-nodejs-server ServerSession
//   ._scheduleExpiration/_sweep; Java ServerSessionImpl.scheduleExpiration, BayeuxServerImpl
//   .sweep, AbstractServerTransport maxInterval default 10000 ms).  A new handshake is a new,
//   empty session.
// * Queues per session only.  Neither server keeps anything per user: a message goes into the
//   queue of each session it is delivered to (cometd-nodejs-server ServerSession._offer; Java
//   ServerSessionImpl.doDeliver/offer), and a message published while no session of the user
//   is subscribed reaches nobody.  The GWS side (notifications of /v2/me/* belong to the agent
//   whose Basic login made the session) is modelled the way a Java service would do it: the
//   double calls ServerSession.deliver on each session of that login subscribed to the channel
//   (cometd-nodejs-server ServerSession.deliver; Java ServerSessionImpl.deliver(Session, String,
//   Object)), inside ServerSession.batch, so one publish is one batch.  That GWS delivers to
//   *every* session of a user is an assumption (see COMETD-NOTES), not documented.
// * Deliveries carry no `id` and no `clientId`: ServerSession.deliver builds {channel, data}
//   (both servers: cometd-nodejs-server ServerSession.deliver; Java ServerSessionImpl.deliver
//   sets channel and data only) and broadcast publishing deletes both (cometd-nodejs-server
//   CometDServer._publish; Java BayeuxServerImpl.doPublish: setClientId(null), setId(null)).
// * Ack extension (cometd-nodejs-server/ack-extension.js AcknowledgedMessagesExtension; Java
//   ext/AcknowledgedMessagesExtension + AcknowledgedMessagesSessionExtension): enabled for a
//   session whose handshake carries ext.ack === true; per-session batch queue; every connect
//   reply closes a batch and carries its number in ext.ack; a connect's ext.ack clears the queue
//   up to that batch; what is not acknowledged is sent again in the next connect reply of the
//   SAME session and dies with it; messages travel only in connect replies
//   (_metaConnectDeliveryOnly; Java setMetaConnectDeliveryOnly(true)).  Per login
//   (/control/configure):
//     "on"     (default) the handshake reply says ext.ack: true (Node AcknowledgedMessages-
//              Extension; Java AcknowledgedMessagesSessionExtension.sendMeta without
//              allowMessageDeliveryDuringHandshake);
//     "object" the handshake reply says ext.ack: {enabled: true, batch: N} and the handshake
//              reply closes batch N, so the first connect reply carries N + 1 (Java
//              AcknowledgedMessagesSessionExtension.sendMeta + closeBatch with
//              allowMessageDeliveryDuringHandshake on); the double closes the batch with the
//              Node extension's own code (a connect reply it never sends);
//     "off"    a server without the extension: ext.ack is taken out of the handshake request
//              before the extension sees it, so replies carry no ext.ack at all.
// * 402 for an unknown session: cometd-nodejs-server words it "402::session_unknown"
//   (CometDServer._unknown); for a login configured java402, or a clientId given to
//   /control/java-402, the double words it "402::Unknown client" as Java does (3.1.9
//   BayeuxServerImpl.unknownSession).  Both servers put advice {reconnect: "handshake",
//   interval: 0} on /meta/handshake and /meta/connect replies only; a /meta/subscribe reply
//   carries none.  The double changes the wording only.
// * multiple-clients: one held connect per BAYEUX_BROWSER cookie (maxSessionsPerBrowser 1);
//   another session's connect on that cookie is answered at once with advice
//   {multiple-clients: true, reconnect: retry, interval: 2000} (multiSessionInterval 2000):
//   cometd-nodejs-server HTTPTransport._addBrowserMetaConnect/_processMetaConnect; Java 3.1.9
//   AbstractHttpTransport.handleMetaConnect/incBrowserId, same option names and defaults.  Set
//   explicitly below so the double cannot lose it.
// * Idle keep-alive connections are closed after 30 s (Jetty's default connector idle timeout, the
//   Java servlet container CometD is usually run in), not after Node's 5 s.
//
// GWS behaviour (Genesys Web Services API v2 documentation, not code):
// * HTTP Basic auth ("Interpreting a Response", "Return Values": statusCode 20 = not
//   authenticated).  Logins registered with /control/auth must give their password, else HTTP
//   401 {"statusCode": 20, "statusMessage": "Access denied"} (with WWW-Authenticate, RFC 7235);
//   any other login, and requests without credentials, are accepted (the double is shared by
//   many tests).  Checked on Bayeux POSTs and on GET /api/v2/..., before CSRF.
// * CSRF (GWS CSRF page): with it on, GETs of /api/v2/... answer X-CSRF-HEADER: X-CSRF-TOKEN and
//   X-CSRF-TOKEN: <token>; a Bayeux POST without that token gets HTTP 403
//   {"statusCode": 20, "statusMessage": "Missing or invalid Csrf token"}.  With it off,
//   GET /api/v2/me answers 404 (a server without that resource).
// * GET /api/v2/me/workitems (any query, e.g. ?fields=*; "Recovering Existing State",
//   "Workitem Resource", "Return Values": a collection named after the resource) answers
//   {"statusCode": 0, "workitems": [resource...]} for the Basic login: built from every
//   WorkitemStateChangeMessage published with "user" (delivered or not): StatusChange and
//   PropertiesUpdated merge data.workitem's fields into the resource of that id (receivedDate,
//   GWS format "2026-11-30 13:20:52.000+0000", added when it first appears); state Completed or
//   Revoked removes it; other notifications (Error, ...) change nothing.  Errors: HTTP status
//   with {"statusCode": 1|3|4|6|20, "statusMessage"} ("Return Values" codes).
//
// Raw text (POST /control/publish with "raw"): what the Bayeux client must survive, sent exactly.
// The message published carries a token string as its data, so the library queues, batches,
// acknowledges and sends it again like any message; when a response body is written, the token's
// JSON string (or, "as": "message", the whole {channel, data} object holding it) is replaced by
// the raw text or bytes.  The control log shows the body before that (the token), so it stays
// JSON.  Which real behaviour each poison copies:
// * what a real server does send: Java CometD serialises the data a publisher gave it (Jetty's
//   JSON or Jackson, as configured), and JSON lets any string through an escape, so an escaped
//   lone surrogate ("\ud800"), "\u0000", ids of thousands of characters, huge arrays, 1e300
//   reach a client as valid JSON a GWS service could well emit;
// * what it should never send, but a faulty or hostile server, or a proxy in between, could:
//   bare NaN / Infinity (not JSON), nesting 100,000 levels deep, an element that is not an object
//   (42, "text"), bytes that are not UTF-8.  No claim that GWS sends these; the client must
//   survive them all the same.

// ------------------------------------------------------------------------------------------------
// Control API (JSON in, JSON out; POST with a JSON body, GET without):
//   GET  /control/ping                 -> {"ok": true}
//   GET  /control/sessions             -> [{"id", "user" (Basic login or null), "subscriptions"}]
//   GET  /control/log                  -> every Bayeux request: {n, tIn, tEnd, status, user, path,
//        messages (the request array as the client sent it), reply (the response array or
//        null), dropped}; tIn / tEnd are performance.now() milliseconds: request received /
//        response written.
//   POST /control/publish  {"channel", "data": [..], "user"?: login, "to"?: clientId}
//        -> {"published": len(data), "sessions": [clientId...]}
//        "user": to every live session of that login subscribed to the channel (or a wildcard
//        of it), one batch each; none: the messages are lost (counted).  Feeds the workitems.
//        "to": to that session (404 if unknown).  Neither: publish on the channel (broadcast).
//        Instead of "data", "raw": [text...] publishes poison as it would reach a client: each text
//        goes into the response body exactly as given, never parsed or re-serialised (see "Raw
//        text" below); "as": "data" (default) makes each text the `data` value of a delivery
//        {channel, data: <text>}, "message" makes it a whole element of the response array;
//        "encoding": "base64" gives each text as the base64 of its bytes (any bytes: not UTF-8).
//   POST /control/configure {"user", "ack"?: "on"|"object"|"off", "java402"?: bool}
//        -> {"user", "ack", "java402"}; for sessions that handshake with that login from now on
//        (java402: for every later 402 to that login).  GET -> {login: {"ack", "java402"}}
//   GET  /control/users                -> {login: {"sessions": [live clientIds], "subscribed": [those
//        of them subscribed to a channel: only these receive what is published], "published": n,
//        "lost": n (published while no session of it was subscribed), "acked": {clientId:
//        [data acknowledged, in order]}}}   (acked: from the connects' ext.ack numbers and the
//        batches the connect replies carried; observation only)
//   POST /control/expire   {"clientId"}  forget the session as on expiry (its queue too): the
//        next connect gets a 402 (a held connect is answered first, so the client comes back now)
//   POST /control/advice   {"clientId", "advice": {...}}  merged into every successful
//        /meta/connect reply to that session from now on (a held connect is answered now)
//   POST /control/drop-next-reply {"clientId"}  the next /meta/connect response carrying messages
//        to that client is lost: the socket is destroyed instead of answered
//   POST /control/java-402 {"clientId"}  402 replies to that client read "402::Unknown client"
//   POST /control/csrf     {"enabled": bool} -> state; each call makes a new token (the old one is
//        refused from then on).  GET -> {"enabled", "token", "fetches": GETs of /api/v2/me,
//        "refused": 403s}
//   POST /control/auth     {"users": {login: password | null}}  register (null: forget) logins
//        whose password is checked -> {"users": [login...], "refused": 401s}; GET: the same
//   GET  /control/workitems            -> {login: [resource...]}
//   POST /control/workitems {"user", "workitems": [resource...]}  replace that login's list
//   POST /control/fail-workitems {"user", "status"?: 500, "count"?: 1, "statusMessage"?}  the next
//        `count` GETs of that login's workitems answer `status` with a GWS JSON error body
'use strict';

const fs = require('fs');
const http = require('http');
const https = require('https');
const crypto = require('crypto');
const {performance} = require('perf_hooks');
const {createCometDServer} = require('cometd-nodejs-server');
const {AcknowledgedMessagesExtension} = require('cometd-nodejs-server/ack-extension');

function usage(problem) {
    process.stderr.write(`${problem}\nusage: node server.js [port] [--timeout MS] [--max-interval MS] `
                         + '[--tls CERT_PEM KEY_PEM]\n');
    process.exit(2);
}

function parseArguments(argv) {
    const options = {port: 0, timeout: 2000, maxInterval: 10000, tls: null};
    for (let i = 0; i < argv.length; ++i) {
        const arg = argv[i];
        const milliseconds = () => {
            const value = Number(argv[++i]);
            if (!Number.isInteger(value) || value < 0) {
                usage(`${arg} needs milliseconds`);
            }
            return value;
        };
        if (arg === '--timeout') {
            options.timeout = milliseconds();
        } else if (arg === '--max-interval') {
            options.maxInterval = milliseconds();
        } else if (arg === '--tls') {
            if (i + 2 >= argv.length) {
                usage('--tls needs a certificate and a key file');
            }
            options.tls = {cert: fs.readFileSync(argv[++i]), key: fs.readFileSync(argv[++i])};
        } else if (/^\d+$/.test(arg)) {
            options.port = Number(arg);
        } else {
            usage(`unknown argument ${arg}`);
        }
    }
    return options;
}

const options = parseArguments(process.argv.slice(2));
const cometd = createCometDServer({
    timeout: options.timeout,
    maxInterval: options.maxInterval,
    maxSessionsPerBrowser: 1,    // the defaults of both servers, stated: multiple-clients advice
    multiSessionInterval: 2000,
});

// -- state -----------------------------------------------------------------------------------------

const sessions = new Map();       // clientId -> live ServerSession
const sessionInfo = new Map();    // clientId -> {user, sent: [{batch, messages}], acked: Set}
const configs = new Map();        // login -> {ack, java402}
const passwords = new Map();      // login -> password (registered logins only)
const stats = new Map();          // login -> {published, lost, acked: Map clientId -> [data]}
const workitems = new Map();      // login -> Map id -> resource
const workitemFailures = new Map();  // login -> {status, count, statusMessage}
const adviceOverrides = new Map();
const dropNext = new Set();
const rawTexts = new Map();       // token -> {bytes: Buffer, as: "data" | "message"} (see "Raw text")
const java402Clients = new Set();
const log = [];
const csrf = {enabled: false, token: null, fetches: 0, refused: 0};
const auth = {refused: 0};

function configOf(login) {
    return Object.assign({ack: 'on', java402: false}, login ? configs.get(login) : undefined);
}

function statsOf(login) {
    if (!stats.has(login)) {
        stats.set(login, {published: 0, lost: 0, acked: new Map()});
    }
    return stats.get(login);
}

function workitemsOf(login) {
    if (!workitems.has(login)) {
        workitems.set(login, new Map());
    }
    return workitems.get(login);
}

function credentials(request) {
    const header = request.headers.authorization || '';
    if (!header.startsWith('Basic ')) {
        return null;
    }
    const decoded = Buffer.from(header.slice(6), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    return colon < 0 ? {login: decoded, password: null}
        : {login: decoded.slice(0, colon), password: decoded.slice(colon + 1)};
}

// -- the ack extension, per login ------------------------------------------------------------------

const ackExtension = new AcknowledgedMessagesExtension();

// The extension's session part closes a batch when it extends a /meta/connect reply; "object"
// makes the handshake reply close one too and say so, as Java's sendMeta does.
function handshakeClosesBatch(session, extension) {
    const outgoing = extension.outgoing;
    extension.outgoing = (sender, to, message, callback) => outgoing(sender, to, message, (failure, result) => {
        if (!failure && message.channel === '/meta/handshake') {
            const closing = {channel: '/meta/connect', id: `handshake ${session.id}`};
            outgoing(sender, to, closing, () => undefined);
            message.ext = message.ext || {};
            message.ext.ack = {enabled: true, batch: closing.ext.ack};
        }
        callback(failure, result);
    });
}

cometd.addExtension({
    incoming: (server, session, message, callback) => {
        if (message.channel === '/meta/connect' && message.ext && typeof message.ext.ack === 'number') {
            acknowledge(session.id, message.ext.ack);  // a known session (unknown ones get no extensions)
        }
        if (message.channel !== '/meta/handshake' || !session) {
            callback(undefined, true);
            return;
        }
        const config = configOf(message._login);
        if (config.ack === 'off' && message.ext) {
            delete message.ext.ack;  // as a server without the extension: nobody reads it
        }
        const before = session.extensions.length;
        ackExtension.incoming(server, session, message, (failure, result) => {
            if (!failure && config.ack === 'object') {
                session.extensions.slice(before).forEach(e => handshakeClosesBatch(session, e));
            }
            callback(failure, result);
        });
    }
});

cometd.addExtension({
    outgoing: (server, sender, session, message, callback) => {
        if (typeof message.error === 'string' && message.error.startsWith('402::')) {
            const request = server.context.request;  // the request being processed (synchronously)
            if (request && request.java402) {
                message.error = '402::Unknown client';  // Java BayeuxServerImpl.unknownSession
            }
        }
        if (message.channel === '/meta/connect' && message.successful && session && adviceOverrides.has(session.id)) {
            message.advice = Object.assign({}, message.advice || {}, adviceOverrides.get(session.id));
        }
        callback(undefined, message);
    }
});

cometd.addListener('sessionAdded', (session, message) => {
    const user = (message && message._login) || null;
    const info = {user, sent: [], acked: new Set()};
    sessions.set(session.id, session);
    sessionInfo.set(session.id, info);
    if (user) {
        statsOf(user).acked.set(session.id, []);
    }
    // Registered after the ack extension's own listener: sees the batch really sent.
    session.addListener('queueDrain', (s, queue, replies) => {
        const connect = replies.find(r => r.channel === '/meta/connect');
        const batch = connect && connect.ext ? connect.ext.ack : undefined;
        if (typeof batch === 'number' && queue.length) {
            info.sent.push({batch, messages: queue.slice()});
        }
    });
});

cometd.addListener('sessionRemoved', session => {
    sessions.delete(session.id);
    sessionInfo.delete(session.id);
});

// A connect's ext.ack acknowledges every batch up to that number (ack-extension.js clearToBatch).
function acknowledge(clientId, ack) {
    const info = sessionInfo.get(clientId);
    if (!info) {
        return;
    }
    const acked = info.user ? statsOf(info.user).acked.get(clientId) : null;
    info.sent = info.sent.filter(({batch, messages}) => {
        if (batch > ack) {
            return true;
        }
        messages.forEach(m => {
            if (!info.acked.has(m)) {  // a message sent again is the same object
                info.acked.add(m);
                if (acked) {
                    acked.push(m.data);
                }
            }
        });
        return false;
    });
}

// -- workitems (GWS "Recovering Existing State") ---------------------------------------------------

const GONE = new Set(['Completed', 'Revoked']);

function gwsDate(date) {
    return date.toISOString().replace('T', ' ').replace('Z', '+0000');
}

function followWorkitem(user, data) {
    if (!data || data.messageType !== 'WorkitemStateChangeMessage'
        || !['StatusChange', 'PropertiesUpdated'].includes(data.notificationType)) {
        return;
    }
    const item = data.workitem;
    if (!item || typeof item !== 'object' || item.id === undefined || item.id === null) {
        return;
    }
    const list = workitemsOf(user);
    const id = String(item.id);
    const existing = list.get(id);
    const resource = Object.assign(existing || {}, JSON.parse(JSON.stringify(item)));
    if (!existing && !resource.receivedDate) {
        resource.receivedDate = gwsDate(new Date());
    }
    if (GONE.has(resource.state)) {
        list.delete(id);
    } else {
        list.set(id, resource);
    }
}

// -- HTTP ------------------------------------------------------------------------------------------

function parse(text) {
    try {
        return JSON.parse(text);
    } catch (e) {
        return undefined;
    }
}

function sendJson(response, status, value, headers = {}) {
    response.writeHead(status, Object.assign({'Content-Type': 'application/json'}, headers));
    response.end(JSON.stringify(value));
}

const GWS_STATUS = {400: 1, 401: 20, 403: 3, 404: 6};  // "Return Values"; anything else: 4

function gwsError(response, status, statusMessage, headers = {}) {
    sendJson(response, status, {statusCode: GWS_STATUS[status] === undefined ? 4 : GWS_STATUS[status],
                                statusMessage}, headers);
}

function accessDenied(response) {
    auth.refused += 1;
    sendJson(response, 401, {statusCode: 20, statusMessage: 'Access denied'},
             {'WWW-Authenticate': 'Basic realm="GWS"'});
}

function authenticated(creds) {
    return !creds || !passwords.has(creds.login) || passwords.get(creds.login) === creds.password;
}

function csrfHeaders() {
    return csrf.enabled ? {'X-CSRF-HEADER': 'X-CSRF-TOKEN', 'X-CSRF-TOKEN': csrf.token} : {};
}

function api(request, response, path) {
    const creds = credentials(request);
    if (!authenticated(creds)) {
        accessDenied(response);
        return;
    }
    const login = creds ? creds.login : null;
    if (path === '/api/v2/me') {
        if (!csrf.enabled) {
            gwsError(response, 404, 'Resource not found');
            return;
        }
        csrf.fetches += 1;
        sendJson(response, 200, {statusCode: 0, user: {userName: login}}, csrfHeaders());
        return;
    }
    if (path === '/api/v2/me/workitems') {
        const failure = login ? workitemFailures.get(login) : undefined;
        if (failure && failure.count > 0) {
            failure.count -= 1;
            gwsError(response, failure.status, failure.statusMessage, csrfHeaders());
            return;
        }
        const list = login && workitems.has(login) ? [...workitems.get(login).values()] : [];
        sendJson(response, 200, {statusCode: 0, workitems: list}, csrfHeaders());
        return;
    }
    gwsError(response, 404, 'Resource not found', csrfHeaders());
}

function bayeux(request, response, content) {
    const messages = parse(content);
    const valid = Array.isArray(messages) && messages.every(m => m && typeof m === 'object' && !Array.isArray(m));
    const creds = credentials(request);
    const login = creds ? creds.login : null;
    // Logged: every request that is a message array (its copy: extensions change the messages).
    const entry = valid ? {n: log.length + 1, tIn: performance.now(), tEnd: null, status: null, user: login,
                           path: request.url.split('?')[0], messages: parse(content), reply: null,
                           dropped: false} : null;
    if (entry) {
        log.push(entry);
    }
    const done = status => {
        if (entry) {
            entry.tEnd = performance.now();
            entry.status = status;
        }
    };
    if (!authenticated(creds)) {
        accessDenied(response);
        done(401);
        return;
    }
    if (csrf.enabled && request.headers['x-csrf-token'] !== csrf.token) {
        csrf.refused += 1;
        sendJson(response, 403, {statusCode: 20, statusMessage: 'Missing or invalid Csrf token'});
        done(403);
        return;
    }
    if (!valid) {
        response.statusCode = 400;
        response.end();
        done(400);
        return;
    }
    const clientId = messages.map(m => m.clientId).find(Boolean);
    const isConnect = messages.some(m => m.channel === '/meta/connect');
    messages.forEach(m => Object.defineProperty(m, '_login', {value: login}));  // for the extensions
    request.java402 = java402Clients.has(clientId) || configOf(login).java402;
    const end = response.end.bind(response);
    response.end = (body, ...rest) => {
        const text = body === undefined || body === null ? '' : String(body);
        const reply = text ? parse(text) : null;
        done(response.statusCode);
        entry.reply = Array.isArray(reply) ? reply : null;
        const carriesMessages = Array.isArray(reply) && reply.some(m => !String(m.channel).startsWith('/meta/'));
        if (isConnect && carriesMessages && dropNext.delete(clientId)) {
            entry.dropped = true;
            response.socket.destroy();
            return response;
        }
        const bytes = withRawTexts(text);
        return bytes === null ? end(body, ...rest) : end(bytes, ...rest.filter(r => typeof r !== 'string'));
    };
    request.body = messages;
    cometd.handle(request, response);
}

// -- control ---------------------------------------------------------------------------------------

function subscribedTo(session, channelName) {
    const names = new Set([channelName, ...cometd.createServerChannel(channelName).wildNames]);
    return session.subscriptions.some(c => names.has(c.name));
}

// The body as bytes, with each token of "raw" publishing replaced by its raw text (see "Raw text");
// null when it holds none.
function withRawTexts(text) {
    if (!rawTexts.size || !text.includes('"@@raw-')) {
        return null;
    }
    const parts = [];
    let last = 0;
    // A token as a data value: its JSON string; as a message: the flat {channel, data} holding it.
    const tokens = /\{[^{}]*"(@@raw-\d+-[0-9a-f]+@@)"[^{}]*\}|"(@@raw-\d+-[0-9a-f]+@@)"/g;
    for (const match of text.matchAll(tokens)) {
        const raw = rawTexts.get(match[1] || match[2]);
        if (!raw) {
            continue;
        }
        let start = match.index;
        let stop = match.index + match[0].length;
        if (match[1] && raw.as !== 'message') {  // the whole object matched, only its data is raw
            start = text.indexOf(`"${match[1]}"`, start);
            stop = start + match[1].length + 2;
        }
        parts.push(Buffer.from(text.slice(last, start), 'utf8'), raw.bytes);
        last = stop;
    }
    parts.push(Buffer.from(text.slice(last), 'utf8'));
    return Buffer.concat(parts);
}

function rawData(body) {
    const texts = Array.isArray(body.raw) ? body.raw : [];
    return texts.map(t => {
        const token = `@@raw-${rawTexts.size + 1}-${crypto.randomBytes(4).toString('hex')}@@`;
        rawTexts.set(token, {bytes: Buffer.from(String(t), body.encoding === 'base64' ? 'base64' : 'utf8'),
                             as: body.as === 'message' ? 'message' : 'data'});
        return token;
    });
}

function publish(body, reply) {
    const channelName = body.channel;
    const data = body.raw !== undefined ? rawData(body) : Array.isArray(body.data) ? body.data : [];
    if (typeof channelName !== 'string' || !/^\/[^/*]+(\/[^/*]+)*$/.test(channelName) || channelName.startsWith('/meta/')) {
        return reply(400, {error: 'a channel is needed'});
    }
    if (body.user) {
        const user = String(body.user);
        const counts = statsOf(user);
        counts.published += data.length;
        data.forEach(d => followWorkitem(user, d));
        const targets = [...sessions.values()].filter(s => sessionInfo.get(s.id).user === user
                                                           && subscribedTo(s, channelName));
        if (!targets.length) {
            counts.lost += data.length;
        }
        targets.forEach(t => t.batch(() => data.forEach(d => t.deliver(null, channelName, d))));
        return reply(200, {published: data.length, sessions: targets.map(t => t.id)});
    }
    if (body.to) {
        const target = sessions.get(body.to);
        if (!target) {
            return reply(404, {error: 'unknown session'});
        }
        target.batch(() => data.forEach(d => target.deliver(null, channelName, d)));
        return reply(200, {published: data.length, sessions: [target.id]});
    }
    const channel = cometd.createServerChannel(channelName);
    const targets = [...sessions.values()].filter(s => subscribedTo(s, channelName));
    data.forEach(d => channel.publish(null, d));
    return reply(200, {published: data.length, sessions: targets.map(t => t.id)});
}

function users() {
    const result = {};
    const of = name => {
        if (!result[name]) {
            result[name] = {sessions: [], subscribed: [], published: 0, lost: 0, acked: {}};
        }
        return result[name];
    };
    for (const [name, counts] of stats) {
        Object.assign(of(name), {published: counts.published, lost: counts.lost,
                                 acked: Object.fromEntries(counts.acked)});
    }
    for (const id of sessions.keys()) {
        const user = sessionInfo.get(id).user;
        if (user) {
            of(user).sessions.push(id);
            if (sessions.get(id).subscriptions.some(c => !c.meta)) {
                of(user).subscribed.push(id);
            }
        }
    }
    return result;
}

function control(method, path, body, reply) {
    const b = body || {};
    const session = b.clientId ? sessions.get(b.clientId) : undefined;
    switch (path) {
        case '/control/ping':
            return reply(200, {ok: true});
        case '/control/sessions':
            return reply(200, [...sessions.values()].map(s => ({
                id: s.id, user: sessionInfo.get(s.id).user, subscriptions: s.subscriptions.map(c => c.name)})));
        case '/control/log':
            return reply(200, log);
        case '/control/publish':
            return publish(b, reply);
        case '/control/configure': {
            if (method === 'GET') {
                return reply(200, Object.fromEntries([...configs.keys()].map(k => [k, configOf(k)])));
            }
            if (!b.user) {
                return reply(400, {error: 'a user is needed'});
            }
            const config = configOf(b.user);
            if (b.ack !== undefined) {
                if (!['on', 'object', 'off'].includes(b.ack)) {
                    return reply(400, {error: 'ack is "on", "object" or "off"'});
                }
                config.ack = b.ack;
            }
            if (b.java402 !== undefined) {
                config.java402 = Boolean(b.java402);
            }
            configs.set(String(b.user), config);
            return reply(200, Object.assign({user: b.user}, config));
        }
        case '/control/users':
            return reply(200, users());
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
            adviceOverrides.set(b.clientId, b.advice);
            if (session && session._scheduler) {
                session._scheduler.resume();  // answer the held connect now, with the new advice
            }
            return reply(200, {ok: true});
        case '/control/drop-next-reply':
            dropNext.add(b.clientId);
            return reply(200, {ok: true});
        case '/control/java-402':
            java402Clients.add(b.clientId);
            return reply(200, {ok: true});
        case '/control/csrf':
            if (method === 'POST') {
                csrf.enabled = Boolean(b.enabled);
                csrf.token = csrf.enabled ? crypto.randomBytes(12).toString('hex') : null;
            }
            return reply(200, csrf);
        case '/control/auth':
            if (method === 'POST') {
                for (const [login, password] of Object.entries(b.users || {})) {
                    if (password === null) {
                        passwords.delete(login);
                    } else {
                        passwords.set(login, String(password));
                    }
                }
            }
            return reply(200, {users: [...passwords.keys()], refused: auth.refused});
        case '/control/workitems':
            if (method === 'POST') {
                if (!b.user || !Array.isArray(b.workitems)) {
                    return reply(400, {error: 'user and workitems are needed'});
                }
                const list = new Map();
                b.workitems.forEach((w, i) => list.set(w && w.id !== undefined ? String(w.id) : `#${i}`, w));
                workitems.set(String(b.user), list);
            }
            return reply(200, Object.fromEntries([...workitems].map(([k, v]) => [k, [...v.values()]])));
        case '/control/fail-workitems': {
            if (!b.user) {
                return reply(400, {error: 'a user is needed'});
            }
            const failure = {status: Number(b.status || 500), count: Number(b.count === undefined ? 1 : b.count),
                             statusMessage: b.statusMessage || 'Internal error'};
            workitemFailures.set(String(b.user), failure);
            return reply(200, Object.assign({user: b.user}, failure));
        }
        default:
            return reply(404, {error: 'unknown control ' + path});
    }
}

function handle(request, response) {
    let content = '';
    request.setEncoding('utf8');
    request.on('data', chunk => {
        content += chunk;
    });
    request.on('end', () => {
        const path = request.url.split('?')[0];
        if (path.startsWith('/control/')) {
            const body = content ? parse(content) : null;
            if (body === undefined) {
                sendJson(response, 400, {error: 'not JSON'});
                return;
            }
            const reply = (status, value) => sendJson(response, status, value);
            try {
                control(request.method, path, body, reply);
            } catch (failure) {
                process.stderr.write(`control ${path}: ${failure.stack || failure}\n`);
                reply(500, {error: String(failure)});
            }
            return;
        }
        if (request.method === 'GET' && path.startsWith('/api/v2/')) {
            api(request, response, path);
            return;
        }
        bayeux(request, response, content);
    });
}

const server = options.tls ? https.createServer(options.tls, handle) : http.createServer(handle);
// Idle keep-alive connections: closed after 30 s, Jetty's default idle timeout, not Node's 5 s,
// which races with clients that keep connections for 15 s (aiohttp) and turns into spurious
// "Server disconnected" failures.
server.keepAliveTimeout = 30000;

server.listen(options.port, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({port: server.address().port}) + '\n');
});

function shutdown() {
    cometd.close();
    server.close();
    process.exit(0);
}

process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
