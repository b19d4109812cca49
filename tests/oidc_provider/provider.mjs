// A real OpenID Connect provider for the sign-in tests: panva/oidc-provider (certified by the OpenID
// Foundation), on 127.0.0.1 only, with its development login form (any user name; the password is not
// checked) and a fresh RSA signing key each run. Started by tests/oidc_support.py:
//
//   OIDC_PORT=4567 OIDC_CLIENTS='[{...}]' OIDC_ACCOUNTS='{"dr.grey": {"groups": ["radiologist"]}}' node provider.mjs
//
// OIDC_ISSUER sets the issuer it names in discovery and tokens (default http://127.0.0.1:<port>): a different
// one plays a provider that is not the one configured. POST /test/clock?skew_s=-7200 makes the token
// endpoint issue as an identity provider whose clock runs that far off (expired ID tokens); 0 sets it right.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const issuer = process.env.OIDC_ISSUER || `http://127.0.0.1:${port}`;
const clients = JSON.parse(process.env.OIDC_CLIENTS || '[]');
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS || '{}');

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), use: 'sig', alg: 'RS256' };

let clockSkewMs = 0;

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomUUID()] },
  pkce: { required: () => true },
  scopes: ['openid', 'profile', 'email', 'groups'],
  claims: { profile: ['name', 'preferred_username'], email: ['email'], groups: ['groups'] },
  features: { devInteractions: { enabled: true }, rpInitiatedLogout: { enabled: true } },
  ttl: { AccessToken: 600, AuthorizationCode: 120, IdToken: 600, Interaction: 600, Session: 3600, Grant: 3600 },
  async findAccount(ctx, id) {
    const account = accounts[id] || {};
    return {
      accountId: id,
      async claims() {
        return {
          sub: id, preferred_username: id, name: account.name || id, email: `${id}@hospital.test`,
          groups: account.groups || [],
        };
      },
    };
  },
});

provider.use(async (ctx, next) => {
  if (ctx.path === '/test/clock' && ctx.method === 'POST') {
    clockSkewMs = Number(ctx.query.skew_s || 0) * 1000;
    ctx.body = { skew_s: clockSkewMs / 1000 };
    return;
  }
  if (ctx.path === '/token' && clockSkewMs) {
    const realNow = Date.now;
    Date.now = () => realNow() + clockSkewMs;
    try {
      await next();
    } finally {
      Date.now = realNow;
    }
    return;
  }
  await next();
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on http://127.0.0.1:${port} as issuer ${issuer}`);
});
