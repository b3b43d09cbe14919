//! IAM trust policies for web identity: writing them (`trust-policy`) and checking a token
//! against one (`verify-token --trust-policy`).
//!
//! AWS matches a web identity token to the IAM OIDC provider whose URL is the token's `iss`;
//! the role's trust policy must name that provider as `Principal.Federated`
//! (`arn:aws:iam::<account>:oidc-provider/<issuer without https://>`), allow
//! `sts:AssumeRoleWithWebIdentity`, and its conditions see the claims as
//! `<issuer without https://>:sub` and `<issuer without https://>:aud`.
//!
//! The evaluation covers what trust policies for service accounts use: `StringEquals`,
//! `StringNotEquals`, `StringLike` / `StringNotLike` (`*` any run of characters, `?` one),
//! their `IgnoreCase` forms, `Null`, the `ForAnyValue:` / `ForAllValues:` set prefixes and the
//! `IfExists` suffix, with IAM's rules for a key the request does not have (a plain operator
//! fails, a negated one and `IfExists` match, `ForAllValues` matches vacuously). Condition keys
//! are compared case-insensitively, values case-sensitively (unless `IgnoreCase`). A token
//! with several audiences gives `:aud` several values; a single-valued operator matches when
//! one of them does. Other operators and keys (they depend on the request, not the token) are
//! reported as not evaluated.

use serde_json::Value;

use super::thumbprint::Thumbprint;
use super::token::{audiences, service_account};
use super::words;
use super::{Check, Status};

/// The audience AWS STS expects.
pub const AWS_AUDIENCE: &str = "sts.amazonaws.com";
/// The audience Azure expects in federated tokens.
pub const AZURE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The action a web identity trust policy must allow.
pub const ACTION: &str = "sts:AssumeRoleWithWebIdentity";

/// The provider part of IAM names: the issuer without `https://`.
pub fn provider(issuer: &str) -> String {
    issuer
        .strip_prefix("https://")
        .unwrap_or(issuer)
        .to_string()
}

/// The OIDC provider ARN for an issuer in an account.
pub fn provider_arn(account: &str, issuer: &str) -> String {
    format!("arn:aws:iam::{account}:oidc-provider/{}", provider(issuer))
}

/// `system:serviceaccount:<ns>:<sa>`.
pub fn subject(namespace: &str, service_account: &str) -> String {
    format!("system:serviceaccount:{namespace}:{service_account}")
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The IAM trust policy (JSON text, the field order of AWS's documentation).
pub fn iam_policy(provider_arn: &str, issuer: &str, subject: &str, audience: &str) -> String {
    let p = provider(issuer);
    format!(
        r#"{{
  "Version": "2012-10-17",
  "Statement": [
    {{
      "Effect": "Allow",
      "Principal": {{
        "Federated": {arn}
      }},
      "Action": "{ACTION}",
      "Condition": {{
        "StringEquals": {{
          {sub_key}: {sub},
          {aud_key}: {aud}
        }}
      }}
    }}
  ]
}}
"#,
        arn = json_str(provider_arn),
        sub_key = json_str(&format!("{p}:sub")),
        sub = json_str(subject),
        aud_key = json_str(&format!("{p}:aud")),
        aud = json_str(audience),
    )
}

/// A Terraform identifier from free text.
fn tf_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

/// A short hex digest of `text`, to keep a shortened name unique.
fn short_hash(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An IAM role name for one service account: `<ns>_<sa>`. Kubernetes names never contain `_`,
/// so no two service accounts get the same name (`a-b`/`c` and `a`/`b-c` would both be
/// `a-b-c` with a dash). IAM allows `[\w+=,.@-]`, at most 64 characters: a longer name is cut
/// and ends with a hash of the whole, so it stays unique.
pub fn role_name(namespace: &str, service_account: &str) -> String {
    let name: String = format!("{namespace}_{service_account}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@-_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.len() <= 64 {
        return name;
    }
    let hash = short_hash(&name);
    format!("{}-{hash}", &name[..64 - 1 - hash.len()])
}

/// A Terraform resource name for one service account: `<ns>__<sa>` with `.` as `_` (a
/// Kubernetes name never has `_`, nor two dots in a row, so `__` separates them unambiguously).
pub fn tf_resource_name(namespace: &str, service_account: &str) -> String {
    // Terraform names allow letters, digits, `_` and `-`: `-` is kept, `.` becomes `_`.
    let part = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut out = format!("{}__{}", part(namespace), part(service_account));
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert(0, '_');
    }
    out
}

/// A Terraform resource name for the cluster's OIDC provider, from the issuer (so blocks for
/// several clusters do not collide).
pub fn tf_provider_name(issuer: &str) -> String {
    format!("oidc_{}", tf_name(&provider(issuer)))
}

/// What AWS needs to know about the issuer's TLS certificate: the thumbprint rule, said once
/// for the AWS CLI and Terraform output.
pub fn thumbprint_rule(issuer: &str) -> String {
    let url = url::Url::parse(issuer).ok();
    let host = url
        .as_ref()
        .and_then(|u| u.host_str().map(String::from))
        .unwrap_or_else(|| provider(issuer));
    let port = url
        .as_ref()
        .and_then(url::Url::port_or_known_default)
        .unwrap_or(443);
    format!(
        r#"# The thumbprint: AWS needs none when the certificate {host} serves chains to a public CA
# AWS trusts (Let's Encrypt, CloudFront, S3, Pages...): it then verifies the chain itself and
# ignores any thumbprint. For a private CA (your own CA, a self-signed certificate) it needs the
# SHA-1 fingerprint of the top certificate of the chain {host} serves, which only a TLS
# connection to it can tell (trust-policy does not connect anywhere):
#   openssl s_client -connect {host}:{port} -servername {host} -showcerts </dev/null 2>/dev/null \
#     | awk '/BEGIN CERTIFICATE/{{pem=""}} {{pem=pem $0 "\n"}} /END CERTIFICATE/{{last=pem}} END{{printf "%s", last}}' \
#     | openssl x509 -noout -fingerprint -sha1 | cut -d= -f2 | tr -d : | tr A-F a-f
# and add it: --thumbprint-list <that> (AWS CLI), thumbprint_list = ["<that>"] (Terraform).
"#
    )
}

/// The thumbprint comment and value for the provider: what was found by asking the host
/// (`trust-policy --thumbprint`), or the rule and the openssl command.
fn thumbprint_parts(issuer: &str, found: Option<&Thumbprint>) -> (String, Option<String>) {
    match found {
        None => (thumbprint_rule(issuer), None),
        Some(Thumbprint::NotNeeded { host }) => (
            format!(
                "# The thumbprint: none needed. The certificate {host} serves chains to a public CA\n# (it verifies against this machine's CA store, as AWS verifies it against its own).\n"
            ),
            None,
        ),
        Some(Thumbprint::Private {
            host,
            sha1,
            subject,
            why,
        }) => (
            format!(
                "# The thumbprint: {host} serves a private chain (it does not verify against this machine's\n# public CAs: {why}), so AWS needs the SHA-1 of its top certificate ({subject}).\n# It changes when that certificate is replaced: update the provider then.\n"
            ),
            Some(sha1.clone()),
        ),
    }
}

/// The AWS CLI commands: the OIDC provider, the role trusting exactly this service account, an
/// example permissions policy, and the annotation.
pub fn aws_cli(
    provider_arn: Option<&str>,
    account: &str,
    issuer: &str,
    namespace: &str,
    service_account: &str,
    audience: &str,
    thumbprint: Option<&Thumbprint>,
) -> String {
    let role = role_name(namespace, service_account);
    let mut out = String::new();
    let (comment, sha1) = thumbprint_parts(issuer, thumbprint);
    match provider_arn {
        Some(arn) => out.push_str(&format!(
            "# 1. The IAM OIDC provider for {issuer} exists already: {arn}
"
        )),
        None => {
            out.push_str(&format!(
                "# 1. The IAM OIDC provider (once per cluster; `aws iam list-open-id-connect-providers` shows it if it exists)
{comment}aws iam create-open-id-connect-provider \\
  --url {issuer} \\
  --client-id-list {audience}{}
",
                sha1.as_ref()
                    .map(|s| format!(" \\\n  --thumbprint-list {s}"))
                    .unwrap_or_default()
            ));
        }
    }
    let account_arg = if account == "<ACCOUNT_ID>" {
        "--account-id <ACCOUNT_ID>".to_string()
    } else {
        format!("--account-id {account}")
    };
    out.push_str(&format!(
        r#"
# 2. The role, trusting only {namespace}/{service_account}
irsa-agent trust-policy --namespace {namespace} --service-account {service_account} {account_arg} --format iam > trust-{role}.json
aws iam create-role --role-name {role} \
  --assume-role-policy-document file://trust-{role}.json

# 3. What the role may do: an example (read one S3 bucket); write what the pod needs
cat > permissions-{role}.json <<'EOF'
{{
  "Version": "2012-10-17",
  "Statement": [
    {{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "arn:aws:s3:::<BUCKET>"}},
    {{"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::<BUCKET>/*"}}
  ]
}}
EOF
aws iam put-role-policy --role-name {role} --policy-name {role}-permissions \
  --policy-document file://permissions-{role}.json
#    or a managed policy: aws iam attach-role-policy --role-name {role} --policy-arn arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess

# 4. Tell the pod identity webhook which role the service account assumes
kubectl annotate serviceaccount --namespace {namespace} {service_account} \
  eks.amazonaws.com/role-arn=arn:aws:iam::{account}:role/{role}
"#
    ));
    out
}

/// The Terraform snippet: the provider (unless an ARN was given) and the role.
pub fn terraform(
    provider_arn: Option<&str>,
    issuer: &str,
    namespace: &str,
    service_account: &str,
    audience: &str,
    thumbprint: Option<&Thumbprint>,
) -> String {
    let p = provider(issuer);
    let (comment, sha1) = thumbprint_parts(issuer, thumbprint);
    let role = role_name(namespace, service_account);
    let tf = tf_resource_name(namespace, service_account);
    let tf_provider = tf_provider_name(issuer);
    let mut out = String::new();
    let principal = match provider_arn {
        Some(arn) => {
            out.push_str(&format!(
                "# The IAM OIDC provider for {issuer} exists already: {arn}\n\n"
            ));
            json_str(arn)
        }
        None => {
            out.push_str(&format!(
                r#"# Once per cluster (several service accounts share it).
{comment}resource "aws_iam_openid_connect_provider" "{tf_provider}" {{
  url            = {url}
  client_id_list = [{aud}]
  {thumbprint}
}}

"#,
                thumbprint = match &sha1 {
                    Some(s) => format!("thumbprint_list = [{}]", json_str(s)),
                    None if thumbprint.is_some() => "# no thumbprint_list: a public CA".to_string(),
                    None => "# thumbprint_list = [\"<SHA-1 of the top certificate>\"]   # only for a private CA, see above".to_string(),
                },
                url = json_str(issuer),
                aud = json_str(audience),
            ));
            format!("aws_iam_openid_connect_provider.{tf_provider}.arn")
        }
    };
    out.push_str(&format!(
        r#"resource "aws_iam_role" "{tf}" {{
  name = {role}
  assume_role_policy = jsonencode({{
    Version = "2012-10-17"
    Statement = [{{
      Effect    = "Allow"
      Principal = {{ Federated = {principal} }}
      Action    = "{ACTION}"
      Condition = {{
        StringEquals = {{
          {sub_key} = {sub}
          {aud_key} = {aud}
        }}
      }}
    }}]
  }})
}}

# What the role may do: an example (read one S3 bucket); write what the pod needs.
resource "aws_iam_role_policy" "{tf}" {{
  name = {policy}
  role = aws_iam_role.{tf}.id
  policy = jsonencode({{
    Version = "2012-10-17"
    Statement = [
      {{ Effect = "Allow", Action = ["s3:ListBucket"], Resource = "arn:aws:s3:::<BUCKET>" }},
      {{ Effect = "Allow", Action = ["s3:GetObject"], Resource = "arn:aws:s3:::<BUCKET>/*" }},
    ]
  }})
}}
"#,
        policy = json_str(&format!("{role}-permissions")),
        role = json_str(&role),
        sub_key = json_str(&format!("{p}:sub")),
        sub = json_str(&subject(namespace, service_account)),
        aud_key = json_str(&format!("{p}:aud")),
        aud = json_str(audience),
    ));
    out
}

/// The Azure federated identity credential (user-assigned managed identity).
pub fn azure(issuer: &str, namespace: &str, service_account: &str) -> String {
    let sub = subject(namespace, service_account);
    format!(
        r#"# Azure: a federated identity credential on a user-assigned managed identity
# (issuer and subject must match the token exactly; Azure accepts RS256 tokens only)
az identity federated-credential create \
  --name {name} \
  --identity-name <IDENTITY_NAME> --resource-group <RESOURCE_GROUP> \
  --issuer {issuer} \
  --subject {sub} \
  --audiences {AZURE_AUDIENCE}
# the same for an app registration: az ad app federated-credential create --id <APP_ID> \
#   --parameters '{{"name":"{name}","issuer":{issuer_json},"subject":{sub_json},"audiences":["{AZURE_AUDIENCE}"]}}'
# the pod's token must be requested with audience {AZURE_AUDIENCE}
"#,
        name = role_name(namespace, service_account),
        issuer_json = json_str(issuer),
        sub_json = json_str(&sub),
    )
}

/// The GCP workload identity pool provider and the binding for the service account.
pub fn gcp(issuer: &str, jwks_uri: &str, namespace: &str, service_account: &str) -> String {
    let sub = subject(namespace, service_account);
    format!(
        r#"# GCP: a workload identity pool provider trusting this issuer
gcloud iam workload-identity-pools providers create-oidc <PROVIDER_ID> \
  --location=global --workload-identity-pool=<POOL_ID> \
  --issuer-uri={issuer} \
  --attribute-mapping=google.subject=assertion.sub
#   or give GCP the keys inline (jwksJson) instead of letting it fetch them from the issuer:
#   curl -sSo jwks.json {jwks_uri} and add --jwk-json-path=jwks.json
#   (then every key rotation needs an update-oidc with the new file)
gcloud iam service-accounts add-iam-policy-binding <GSA>@<PROJECT_ID>.iam.gserviceaccount.com \
  --role=roles/iam.workloadIdentityUser \
  --member=principal://iam.googleapis.com/projects/<PROJECT_NUMBER>/locations/global/workloadIdentityPools/<POOL_ID>/subject/{sub}
# the pod's token must be requested with audience
#   https://iam.googleapis.com/projects/<PROJECT_NUMBER>/locations/global/workloadIdentityPools/<POOL_ID>/providers/<PROVIDER_ID>
"#
    )
}

// ---------------------------------------------------------------------------------------
// Evaluation.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Equals,
    EqualsIgnoreCase,
    Like,
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOp {
    None,
    AnyValue,
    AllValues,
}

#[derive(Debug, Clone, Copy)]
struct Operator {
    base: Base,
    negated: bool,
    set: SetOp,
    if_exists: bool,
}

fn parse_operator(name: &str) -> Option<Operator> {
    let (set, rest) = if let Some(r) = name.strip_prefix("ForAnyValue:") {
        (SetOp::AnyValue, r)
    } else if let Some(r) = name.strip_prefix("ForAllValues:") {
        (SetOp::AllValues, r)
    } else {
        (SetOp::None, name)
    };
    let (rest, if_exists) = match rest.strip_suffix("IfExists") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (base, negated) = match rest {
        "StringEquals" => (Base::Equals, false),
        "StringNotEquals" => (Base::Equals, true),
        "StringEqualsIgnoreCase" => (Base::EqualsIgnoreCase, false),
        "StringNotEqualsIgnoreCase" => (Base::EqualsIgnoreCase, true),
        "StringLike" => (Base::Like, false),
        "StringNotLike" => (Base::Like, true),
        "Null" => (Base::Null, false),
        _ => return None,
    };
    Some(Operator {
        base,
        negated,
        set,
        if_exists,
    })
}

/// IAM's `StringLike`: `*` any run of characters (also none), `?` exactly one.
pub fn glob(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn values_of(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::Bool(b) => vec![b.to_string()],
        other => vec![other.to_string()],
    }
}

fn positive(base: Base, policy: &[String], value: &str) -> bool {
    policy.iter().any(|p| match base {
        Base::Equals => p == value,
        Base::EqualsIgnoreCase => p.eq_ignore_ascii_case(value),
        Base::Like => glob(p, value),
        Base::Null => false,
    })
}

/// IAM's evaluation of one operator on one key.
fn evaluate_condition(op: Operator, policy: &[String], context: Option<&[String]>) -> bool {
    if op.base == Base::Null {
        let want_absent = policy.iter().any(|p| p.eq_ignore_ascii_case("true"));
        return context.is_none() == want_absent;
    }
    let Some(context) = context.filter(|c| !c.is_empty()) else {
        return op.if_exists || op.negated || op.set == SetOp::AllValues;
    };
    let test = |v: &String| positive(op.base, policy, v) != op.negated;
    match op.set {
        SetOp::AllValues => context.iter().all(test),
        SetOp::AnyValue => context.iter().any(test),
        SetOp::None if op.negated => context.iter().all(test),
        SetOp::None => context.iter().any(test),
    }
}

/// Why a value does not satisfy the condition's values, in words.
fn mismatch_words(name: &str, got: &[String], policy: &[String], like: bool) -> String {
    let mut hints = Vec::new();
    for g in got {
        for p in policy {
            if name == "sub"
                && let (Some((gns, gsa)), Some((pns, psa))) =
                    (service_account(g), service_account(p))
                && !like
            {
                if gns != pns && gsa == psa {
                    hints.push(format!(
                        "the namespace differs: {gns:?} in the token, {pns:?} in the policy"
                    ));
                } else if gns == pns && gsa != psa {
                    hints.push(format!(
                        "the service account differs: {gsa:?} in the token, {psa:?} in the policy"
                    ));
                }
            } else if let Some(why) = words::near_miss(p, g).filter(|_| !like) {
                hints.push(format!(
                    "the policy's {p:?} looks like a typo of the token's {g:?}: it {why}"
                ));
            }
        }
    }
    hints.dedup();
    if hints.is_empty() {
        String::new()
    } else {
        format!(" ({})", hints.join("; "))
    }
}

fn as_list(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::Array(a)) => a.clone(),
        Some(other) => vec![other.clone()],
        None => Vec::new(),
    }
}

/// Checks a trust policy (JSON text) against a token's claims. The verdict is the check
/// `policy.verdict`: pass when an Allow statement lets this token assume the role.
pub fn evaluate(policy_text: &str, claims: &Value) -> Vec<Check> {
    let doc: Value = match serde_json::from_str(policy_text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Check::fail(
                "policy.verdict",
                format!("the trust policy is not JSON: {e}"),
            )];
        }
    };
    let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    let provider = provider(iss);
    let sub = claims
        .get("sub")
        .and_then(|v| v.as_str())
        .map(|s| vec![s.to_string()]);
    let auds = audiences(claims);
    let context = |key: &str| -> Option<(String, Vec<String>)> {
        let (p, name) = key.rsplit_once(':')?;
        let name = name.to_ascii_lowercase();
        if !p.eq_ignore_ascii_case(&provider) {
            return None;
        }
        match name.as_str() {
            "sub" => sub.clone().map(|s| (name, s)),
            "aud" => (!auds.is_empty()).then(|| (name, auds.clone())),
            _ => None,
        }
    };
    let statements = as_list(doc.get("Statement"));
    if statements.is_empty() {
        return vec![Check::fail(
            "policy.verdict",
            "the trust policy has no Statement",
        )];
    }
    let mut per_statement: Vec<(bool, bool, Vec<Check>)> = Vec::new();
    for (i, st) in statements.iter().enumerate() {
        let label = match st.get("Sid").and_then(|s| s.as_str()) {
            Some(sid) if !sid.is_empty() => format!("statement {} ({sid})", i + 1),
            _ => format!("statement {}", i + 1),
        };
        let allow = st.get("Effect").and_then(|e| e.as_str()) == Some("Allow");
        let mut checks = Vec::new();
        let mut matched = true;
        // Action.
        let actions: Vec<String> = as_list(st.get("Action"))
            .iter()
            .flat_map(values_of)
            .collect();
        if actions
            .iter()
            .any(|a| glob(&a.to_ascii_lowercase(), &ACTION.to_ascii_lowercase()))
        {
            checks.push(
                Check::pass("policy.action", format!("allows {ACTION}")).subject(label.clone()),
            );
        } else {
            matched = false;
            checks.push(
                Check::fail(
                    "policy.action",
                    format!("Action is {}, not {ACTION}", words::list(&actions)),
                )
                .subject(label.clone())
                .fix(format!("\"Action\": \"{ACTION}\"")),
            );
        }
        // Principal.
        let federated: Vec<String> = st
            .get("Principal")
            .and_then(|p| p.get("Federated"))
            .map(values_of)
            .unwrap_or_default();
        let expected_suffix = format!(":oidc-provider/{provider}");
        if federated
            .iter()
            .any(|f| f.ends_with(&expected_suffix) && f.starts_with("arn:"))
        {
            checks.push(
                Check::pass(
                    "policy.principal",
                    format!("Principal.Federated is the provider for {iss}"),
                )
                .subject(label.clone()),
            );
        } else {
            matched = false;
            let named: Vec<String> = federated
                .iter()
                .map(|f| {
                    let p = f.split(":oidc-provider/").nth(1).unwrap_or(f);
                    match words::difference(p, &provider) {
                        Some(why) if words::near_miss(p, &provider).is_some() => {
                            format!("{f} (its provider {p:?} {why})")
                        }
                        _ => f.clone(),
                    }
                })
                .collect();
            checks.push(
                Check::fail(
                    "policy.principal",
                    if federated.is_empty() {
                        "no Principal.Federated: a web identity trust policy must name the OIDC provider".to_string()
                    } else {
                        format!(
                            "Principal.Federated is {}, but AWS matches this token (iss {iss:?}) to the provider oidc-provider/{provider}",
                            words::list(&named)
                        )
                    },
                )
                .subject(label.clone())
                .fix(format!(
                    "\"Federated\": \"arn:aws:iam::<ACCOUNT_ID>:oidc-provider/{provider}\" (`irsa-agent trust-policy` prints it)"
                )),
            );
        }
        // Conditions.
        if let Some(conditions) = st.get("Condition").and_then(|c| c.as_object()) {
            for (op_name, block) in conditions {
                let Some(map) = block.as_object() else {
                    continue;
                };
                for (key, value) in map {
                    let subject = format!("{label}: {op_name} {key}");
                    let policy_values = values_of(value);
                    let Some(op) = parse_operator(op_name) else {
                        checks.push(
                            Check::warn(
                                "policy.condition",
                                format!("{op_name} is not evaluated here; it must hold too"),
                            )
                            .subject(subject),
                        );
                        continue;
                    };
                    let ctx = context(key);
                    let (provider_part, claim) = key.rsplit_once(':').unwrap_or(("", key));
                    let is_token_key = provider_part.eq_ignore_ascii_case(&provider)
                        || (matches!(claim.to_ascii_lowercase().as_str(), "sub" | "aud")
                            && (provider_part.contains('/') || provider_part.contains('.')));
                    if ctx.is_none() && !is_token_key {
                        checks.push(
                            Check::warn(
                                "policy.condition",
                                format!("{key} does not come from the token; not evaluated here"),
                            )
                            .subject(subject),
                        );
                        continue;
                    }
                    let got = ctx.as_ref().map(|(_, v)| v.clone());
                    let ok = evaluate_condition(op, &policy_values, got.as_deref());
                    let shown = |v: &[String]| {
                        if v.len() == 1 {
                            format!("{:?}", v[0])
                        } else {
                            format!(
                                "[{}]",
                                v.iter()
                                    .map(|s| format!("{s:?}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    };
                    let check = match (&got, ok) {
                        (Some(g), true) => Check::pass(
                            "policy.condition",
                            format!(
                                "the token's {} {} satisfies {}",
                                claim,
                                shown(g),
                                shown(&policy_values)
                            ),
                        ),
                        (None, true) => Check::pass(
                            "policy.condition",
                            format!("{key} is not in the request, which {op_name} accepts"),
                        ),
                        (Some(g), false) => Check::fail(
                            "policy.condition",
                            format!(
                                "the token's {} {} does not satisfy {} {}{}",
                                claim,
                                shown(g),
                                op_name,
                                shown(&policy_values),
                                mismatch_words(
                                    &claim.to_ascii_lowercase(),
                                    g,
                                    &policy_values,
                                    op.base == Base::Like
                                )
                            ),
                        ),
                        (None, false) => {
                            let why = if provider_part.eq_ignore_ascii_case(&provider) {
                                format!("the token has no {claim}")
                            } else {
                                let near = words::near_miss(provider_part, &provider)
                                    .map(|w| format!(": {provider_part:?} {w}"))
                                    .unwrap_or_default();
                                format!(
                                    "the key names the provider {provider_part:?}, but this token's provider is {provider:?}{near}, so the request has no such key"
                                )
                            };
                            Check::fail(
                                "policy.condition",
                                format!("{op_name} on {key} fails: {why}"),
                            )
                        }
                    };
                    if check.status == Status::Fail {
                        matched = false;
                    }
                    checks.push(check.subject(subject));
                }
            }
        }
        per_statement.push((allow, matched, checks));
    }
    let denied = per_statement.iter().position(|(allow, m, _)| !allow && *m);
    let allowed = per_statement.iter().position(|(allow, m, _)| *allow && *m);
    let mut out = Vec::new();
    match (denied, allowed) {
        (Some(d), _) => {
            out.extend(per_statement[d].2.clone());
            out.push(Check::fail(
                "policy.verdict",
                format!(
                    "statement {} (Deny) matches this token: AssumeRoleWithWebIdentity is denied",
                    d + 1
                ),
            ));
        }
        (None, Some(a)) => {
            out.extend(per_statement[a].2.clone());
            out.push(Check::pass(
                "policy.verdict",
                format!("statement {} allows {ACTION} with this token", a + 1),
            ));
        }
        (None, None) => {
            for (allow, _, checks) in &per_statement {
                if *allow {
                    out.extend(checks.clone());
                }
            }
            out.push(
                Check::fail(
                    "policy.verdict",
                    "no statement allows this token: AWS STS would answer AccessDenied (\"Not authorized to perform sts:AssumeRoleWithWebIdentity\")",
                )
                .fix("fix the failing conditions above; `irsa-agent trust-policy --namespace NS --service-account SA` prints a policy that matches"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_per_service_account() {
        // With a dash both were "a-b-c".
        assert_ne!(role_name("a-b", "c"), role_name("a", "b-c"));
        assert_ne!(tf_resource_name("a-b", "c"), tf_resource_name("a", "b-c"));
        assert_ne!(tf_resource_name("a", "b.c"), tf_resource_name("a", "b-c"));
        assert_eq!(role_name("default", "app"), "default_app");
        assert_eq!(tf_resource_name("default", "app"), "default__app");
        // Long names are cut to IAM's 64 characters and stay distinct.
        let ns = "n".repeat(63);
        let (a, b) = (role_name(&ns, "sa-one"), role_name(&ns, "sa-two"));
        assert!(a.len() <= 64 && b.len() <= 64, "{a} {b}");
        assert_ne!(a, b);
        assert!(
            role_name(&ns, "x")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c))
        );
        assert_eq!(
            tf_provider_name("https://oidc.example.com/homelab"),
            "oidc_oidc_example_com_homelab"
        );
    }

    #[test]
    fn aws_cli_commands_are_complete() {
        let out = aws_cli(
            None,
            "123456789012",
            "https://oidc.example.com/homelab",
            "default",
            "app",
            AWS_AUDIENCE,
            None,
        );
        for needle in [
            "aws iam create-open-id-connect-provider \\\n  --url https://oidc.example.com/homelab \\\n  --client-id-list sts.amazonaws.com\n",
            "--format iam > trust-default_app.json",
            "aws iam create-role --role-name default_app \\\n  --assume-role-policy-document file://trust-default_app.json",
            "aws iam put-role-policy --role-name default_app --policy-name default_app-permissions",
            "eks.amazonaws.com/role-arn=arn:aws:iam::123456789012:role/default_app",
            "AWS needs none when the certificate oidc.example.com serves chains to a public CA",
            "openssl s_client -connect oidc.example.com:443 -servername oidc.example.com",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
        }
        // An existing provider is not created again.
        let out = aws_cli(
            Some("arn:aws:iam::123456789012:oidc-provider/oidc.example.com/homelab"),
            "123456789012",
            "https://oidc.example.com/homelab",
            "default",
            "app",
            AWS_AUDIENCE,
            None,
        );
        assert!(!out.contains("create-open-id-connect-provider"), "{out}");
        // What the host said, when it was asked.
        let private = Thumbprint::Private {
            host: "oidc.example.com".into(),
            sha1: "f0d93e834cefbbff303026f0a22574d191c2661c".into(),
            subject: "CN=My CA".into(),
            why: "invalid peer certificate: UnknownIssuer".into(),
        };
        let issuer = "https://oidc.example.com/homelab";
        let out = aws_cli(
            None,
            "1",
            issuer,
            "default",
            "app",
            AWS_AUDIENCE,
            Some(&private),
        );
        assert!(
            out.contains("--client-id-list sts.amazonaws.com \\\n  --thumbprint-list f0d93e834cefbbff303026f0a22574d191c2661c\n"),
            "{out}"
        );
        let tf = terraform(None, issuer, "default", "app", AWS_AUDIENCE, Some(&private));
        assert!(
            tf.contains("thumbprint_list = [\"f0d93e834cefbbff303026f0a22574d191c2661c\"]"),
            "{tf}"
        );
        let public = Thumbprint::NotNeeded {
            host: "oidc.example.com".into(),
        };
        let out = aws_cli(
            None,
            "1",
            issuer,
            "default",
            "app",
            AWS_AUDIENCE,
            Some(&public),
        );
        assert!(
            !out.contains("--thumbprint-list") && out.contains("none needed"),
            "{out}"
        );
    }

    #[test]
    fn globs() {
        assert!(glob(
            "system:serviceaccount:default:*",
            "system:serviceaccount:default:app"
        ));
        assert!(glob(
            "system:serviceaccount:*:app",
            "system:serviceaccount:prod:app"
        ));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*", ""));
        assert!(!glob(
            "system:serviceaccount:default:*",
            "system:serviceaccount:prod:app"
        ));
        assert!(glob("*a*b*", "xxaxxbxx"));
    }

    #[test]
    fn iam_missing_key_rules() {
        let eq = parse_operator("StringEquals").expect("op");
        let neq = parse_operator("StringNotEquals").expect("op");
        let eq_if = parse_operator("StringEqualsIfExists").expect("op");
        let all = parse_operator("ForAllValues:StringEquals").expect("op");
        let any = parse_operator("ForAnyValue:StringLike").expect("op");
        let p = vec!["sts.amazonaws.com".to_string()];
        assert!(!evaluate_condition(eq, &p, None));
        assert!(evaluate_condition(neq, &p, None));
        assert!(evaluate_condition(eq_if, &p, None));
        assert!(evaluate_condition(all, &p, None));
        let two = vec!["sts.amazonaws.com".to_string(), "other".to_string()];
        assert!(evaluate_condition(eq, &p, Some(&two)));
        assert!(!evaluate_condition(all, &p, Some(&two)));
        assert!(evaluate_condition(any, &["sts.*".to_string()], Some(&two)));
        assert!(!evaluate_condition(neq, &p, Some(&two)));
        assert!(parse_operator("ArnLike").is_none());
    }

    #[test]
    fn generated_policy_is_json_and_passes_for_its_token() {
        let issuer = "https://oidc.example.com/cluster-a";
        let text = iam_policy(
            &provider_arn("123456789012", issuer),
            issuer,
            &subject("default", "app"),
            AWS_AUDIENCE,
        );
        let claims = serde_json::json!({"iss": issuer, "sub": "system:serviceaccount:default:app", "aud": ["sts.amazonaws.com"]});
        let checks = evaluate(&text, &claims);
        assert!(
            checks.iter().all(|c| c.status == Status::Pass),
            "{checks:#?}"
        );
        let other = serde_json::json!({"iss": issuer, "sub": "system:serviceaccount:prod:app", "aud": "sts.amazonaws.com"});
        let checks = evaluate(&text, &other);
        assert_eq!(checks.last().map(|c| c.status), Some(Status::Fail));
    }
}
