//! A small OCI distribution client: what the mirror needs and nothing more.
//!
//! Blob HEAD, cross-repository mount, chunked upload (POST -> PATCH chunks -> PUT `?digest=`),
//! monolithic upload of small blobs, manifest PUT/GET, and Harbor's project API. Auth follows
//! the registry's `WWW-Authenticate` challenge: none, HTTP basic, or the bearer-token flow of
//! Harbor and Distribution (`GET <realm>?service=..&scope=repository:<repo>:pull,push` with basic
//! credentials -> token, reused per scope until it expires).
//!
//! Why not `oci-client`: 0.14 is the newest that shares our lock, and it buffers or re-reads
//! layers where we stream them once from S3 while hashing; this client is ~400 lines on the
//! reqwest already in our tree.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use rhio_core::oci::{Challenge, IMAGE_MANIFEST_MEDIA_TYPE, parse_challenge, repository_scope};
use thiserror::Error;
use tokio::sync::Mutex;

/// Harbor's token service answers without `expires_in` sometimes; Distribution's default.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("registry {registry} is unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("registry {registry} refused {user}: {detail}")]
    Unauthorized {
        registry: String,
        user: String,
        detail: String,
    },
    #[error("registry {registry} answered {status} to {what}: {detail}")]
    Refused {
        registry: String,
        what: String,
        status: u16,
        detail: String,
    },
    #[error("registry {registry}: {detail}")]
    Protocol { registry: String, detail: String },
}

impl RegistryError {
    /// Wrong or missing credentials (retrying soon will not help).
    pub fn is_auth(&self) -> bool {
        matches!(self, RegistryError::Unauthorized { .. })
    }
}

#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.user)
    }
}

/// How the registry wants to be authenticated, learned from its first challenge.
#[derive(Debug, Clone)]
enum Scheme {
    /// Not asked yet: requests go out anonymously.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Default)]
struct Tokens {
    /// Token per scope set, with the time to renew it.
    by_scope: HashMap<String, (String, Instant)>,
}

/// Result of a mount attempt.
#[derive(Debug)]
pub enum Mount {
    /// The blob is now in the repository.
    Mounted,
    /// The registry did not mount and opened an upload session instead.
    Upload(String),
}

/// An upload session: where the next chunk goes and how many bytes it has.
#[derive(Debug)]
pub struct Upload {
    pub repository: String,
    pub location: String,
    pub offset: u64,
}

pub struct Registry {
    base: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    scheme: Mutex<Scheme>,
    tokens: Mutex<Tokens>,
}

impl Registry {
    pub fn new(
        base: &str,
        credentials: Option<Credentials>,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        // rhio's one TLS provider (main installs it; a library user may not have).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("rhio/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| RegistryError::Protocol {
                registry: base.into(),
                detail: format!("cannot build an HTTP client: {err}"),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            credentials,
            scheme: Mutex::new(Scheme::Unknown),
            tokens: Mutex::new(Tokens::default()),
        })
    }

    /// Who requests go out as (for messages: never the secret).
    pub fn user(&self) -> String {
        match &self.credentials {
            Some(credentials) => format!("user {:?}", credentials.user),
            None => "anonymous access".into(),
        }
    }

    fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_string()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }

    fn unreachable(&self, err: reqwest::Error) -> RegistryError {
        RegistryError::Unreachable {
            registry: self.base.clone(),
            detail: error_chain(&err),
        }
    }

    fn unauthorized(&self, detail: String) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.base.clone(),
            user: self.user(),
            detail,
        }
    }

    async fn refused(&self, what: &str, response: Response) -> RegistryError {
        let status = response.status().as_u16();
        let detail = response.text().await.unwrap_or_default();
        RegistryError::Refused {
            registry: self.base.clone(),
            what: what.to_string(),
            status,
            detail: detail.chars().take(300).collect(),
        }
    }

    /// Sends a request built by `make` with the credentials the registry asks for; `scopes`
    /// are the token scopes it needs (`repository:<repo>:pull,push`, ...). On a 401 the
    /// challenge is answered once and the request sent again.
    async fn send(
        &self,
        scopes: &[String],
        make: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        for attempt in 0..2 {
            let request = self.authorize(make(&self.http), scopes).await?;
            let response = request.send().await.map_err(|err| self.unreachable(err))?;
            if response.status() != StatusCode::UNAUTHORIZED {
                if response.status() == StatusCode::FORBIDDEN {
                    let detail = response.text().await.unwrap_or_default();
                    return Err(self.unauthorized(format!(
                        "403 Forbidden for {}: {}",
                        scopes.join(" "),
                        detail.chars().take(200).collect::<String>()
                    )));
                }
                return Ok(response);
            }
            let challenge = response
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|value| value.to_str().ok())
                .and_then(parse_challenge);
            if attempt == 1 {
                return Err(self.unauthorized(format!(
                    "401 Unauthorized for {} with the credentials it asked for",
                    scopes.join(" ")
                )));
            }
            match challenge {
                Some(Challenge::Basic) => {
                    if self.credentials.is_none() {
                        return Err(self.unauthorized("it asks for HTTP basic credentials".into()));
                    }
                    *self.scheme.lock().await = Scheme::Basic;
                }
                Some(Challenge::Bearer { realm, service, .. }) => {
                    *self.scheme.lock().await = Scheme::Bearer { realm, service };
                    // A token cached for these scopes was refused (expired early, revoked).
                    self.tokens.lock().await.by_scope.remove(&scopes.join(" "));
                }
                None => {
                    return Err(self.unauthorized(
                        "401 without a WWW-Authenticate challenge rhio understands".into(),
                    ));
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn authorize(
        &self,
        request: RequestBuilder,
        scopes: &[String],
    ) -> Result<RequestBuilder, RegistryError> {
        let scheme = self.scheme.lock().await.clone();
        match scheme {
            Scheme::Unknown => Ok(request),
            Scheme::Basic => {
                let credentials = self.credentials.as_ref().expect("basic needs credentials");
                Ok(request.basic_auth(&credentials.user, Some(&credentials.password)))
            }
            Scheme::Bearer { realm, service } => {
                let token = self.token(&realm, service.as_deref(), scopes).await?;
                Ok(request.bearer_auth(token))
            }
        }
    }

    /// A token for `scopes`, from the cache or the token service.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<String, RegistryError> {
        let key = scopes.join(" ");
        let mut tokens = self.tokens.lock().await;
        if let Some((token, renew_at)) = tokens.by_scope.get(&key)
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let mut url = Url::parse(realm).map_err(|err| RegistryError::Protocol {
            registry: self.base.clone(),
            detail: format!("token realm {realm:?} is not a URL: {err}"),
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url);
        if let Some(credentials) = &self.credentials {
            request = request.basic_auth(&credentials.user, Some(&credentials.password));
        }
        let response = request
            .send()
            .await
            .map_err(|err| RegistryError::Unreachable {
                registry: self.base.clone(),
                detail: format!("token service {realm}: {}", error_chain(&err)),
            })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.unauthorized(format!(
                "the token service {realm} answered {status} (wrong user name or password?)"
            )));
        }
        if !status.is_success() {
            return Err(self
                .refused(&format!("a token request to {realm}"), response)
                .await);
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|err| RegistryError::Protocol {
                registry: self.base.clone(),
                detail: format!("token service {realm} sent no token: {err}"),
            })?;
        let token =
            answer
                .token
                .or(answer.access_token)
                .ok_or_else(|| RegistryError::Protocol {
                    registry: self.base.clone(),
                    detail: format!("token service {realm} sent no token"),
                })?;
        let ttl = answer
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_TTL);
        let renew_at = Instant::now() + ttl.saturating_sub(TOKEN_MARGIN);
        tokens.by_scope.insert(key, (token.clone(), renew_at));
        Ok(token)
    }

    fn push_scopes(repository: &str) -> Vec<String> {
        vec![repository_scope(repository, "pull,push")]
    }

    /// True when the repository has the blob.
    pub async fn has_blob(&self, repository: &str, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("/v2/{repository}/blobs/{digest}"));
        let response = self
            .send(&Self::push_scopes(repository), |http| http.head(&url))
            .await?;
        match response.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refused(&format!("HEAD blob {digest}"), response).await),
        }
    }

    /// Asks the registry to mount `digest` from repository `from` into `repository`.
    pub async fn mount(
        &self,
        repository: &str,
        digest: &str,
        from: &str,
    ) -> Result<Mount, RegistryError> {
        let url = self.url(&format!(
            "/v2/{repository}/blobs/uploads/?mount={}&from={from}",
            encode_digest(digest)
        ));
        let scopes = vec![
            repository_scope(repository, "pull,push"),
            repository_scope(from, "pull"),
        ];
        let response = self.send(&scopes, |http| http.post(&url)).await?;
        match response.status() {
            StatusCode::CREATED => Ok(Mount::Mounted),
            StatusCode::ACCEPTED => Ok(Mount::Upload(self.location(&response)?)),
            _ => Err(self.refused(&format!("mount of {digest}"), response).await),
        }
    }

    fn location(&self, response: &Response) -> Result<String, RegistryError> {
        response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(|location| self.url(location))
            .ok_or_else(|| RegistryError::Protocol {
                registry: self.base.clone(),
                detail: "an upload answer without a Location header".into(),
            })
    }

    /// Opens an upload session in `repository`.
    pub async fn start_upload(&self, repository: &str) -> Result<Upload, RegistryError> {
        let url = self.url(&format!("/v2/{repository}/blobs/uploads/"));
        let response = self
            .send(&Self::push_scopes(repository), |http| {
                http.post(&url).header(reqwest::header::CONTENT_LENGTH, 0)
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.refused("POST blob upload", response).await);
        }
        Ok(Upload {
            repository: repository.to_string(),
            location: self.location(&response)?,
            offset: 0,
        })
    }

    /// Continues an upload session from a mount answer.
    pub fn resume_upload(&self, repository: &str, location: String) -> Upload {
        Upload {
            repository: repository.to_string(),
            location,
            offset: 0,
        }
    }

    /// Sends one chunk of an upload (PATCH).
    pub async fn upload_chunk(
        &self,
        upload: &mut Upload,
        chunk: Bytes,
    ) -> Result<(), RegistryError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let end = upload.offset + chunk.len() as u64 - 1;
        let range = format!("{}-{end}", upload.offset);
        let location = upload.location.clone();
        let response = self
            .send(&Self::push_scopes(&upload.repository), |http| {
                http.request(Method::PATCH, &location)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_RANGE, &range)
                    .body(chunk.clone())
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self
                .refused(&format!("PATCH bytes {range} of an upload"), response)
                .await);
        }
        upload.location = self.location(&response)?;
        upload.offset = end + 1;
        Ok(())
    }

    /// Completes an upload (PUT `?digest=`); the registry checks the digest.
    pub async fn finish_upload(&self, upload: Upload, digest: &str) -> Result<(), RegistryError> {
        self.put_upload(&upload, digest, Bytes::new()).await
    }

    /// The closing PUT of an upload session, with the last bytes (or none) as its body.
    async fn put_upload(
        &self,
        upload: &Upload,
        digest: &str,
        body: Bytes,
    ) -> Result<(), RegistryError> {
        let separator = if upload.location.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{separator}digest={}",
            upload.location,
            encode_digest(digest)
        );
        let response = self
            .send(&Self::push_scopes(&upload.repository), |http| {
                http.put(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .refused(&format!("PUT of blob {digest}"), response)
                .await);
        }
        Ok(())
    }

    /// Abandons an upload session (best effort: the registry expires it anyway).
    pub async fn cancel_upload(&self, upload: Upload) {
        let location = upload.location.clone();
        let _ = self
            .send(&Self::push_scopes(&upload.repository), |http| {
                http.delete(&location)
            })
            .await;
    }

    /// Uploads a small blob in one request after the session is open.
    pub async fn put_blob(
        &self,
        repository: &str,
        digest: &str,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        let upload = self.start_upload(repository).await?;
        self.put_upload(&upload, digest, data).await
    }

    /// Stores an image manifest under `reference` (a tag or digest).
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        manifest: Bytes,
    ) -> Result<(), RegistryError> {
        let url = self.url(&format!("/v2/{repository}/manifests/{reference}"));
        let response = self
            .send(&Self::push_scopes(repository), |http| {
                http.put(&url)
                    .header(reqwest::header::CONTENT_TYPE, IMAGE_MANIFEST_MEDIA_TYPE)
                    .body(manifest.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(self
                .refused(&format!("PUT manifest {repository}:{reference}"), response)
                .await);
        }
        Ok(())
    }

    /// Reads an image manifest; `None` when the repository or reference does not exist.
    pub async fn get_manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let url = self.url(&format!("/v2/{repository}/manifests/{reference}"));
        let scopes = vec![repository_scope(repository, "pull")];
        let response = self
            .send(&scopes, |http| {
                http.get(&url)
                    .header(reqwest::header::ACCEPT, IMAGE_MANIFEST_MEDIA_TYPE)
            })
            .await?;
        match response.status() {
            StatusCode::OK => response
                .bytes()
                .await
                .map(Some)
                .map_err(|err| self.unreachable(err)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self
                .refused(&format!("GET manifest {repository}:{reference}"), response)
                .await),
        }
    }

    /// Reads a whole blob (small blobs, and tests).
    pub async fn get_blob(&self, repository: &str, digest: &str) -> Result<Bytes, RegistryError> {
        let url = self.url(&format!("/v2/{repository}/blobs/{digest}"));
        let scopes = vec![repository_scope(repository, "pull")];
        let response = self.send(&scopes, |http| http.get(&url)).await?;
        if response.status() != StatusCode::OK {
            return Err(self.refused(&format!("GET blob {digest}"), response).await);
        }
        response.bytes().await.map_err(|err| self.unreachable(err))
    }

    /// Creates a Harbor project (`POST /api/v2.0/projects`); an existing one is fine.
    pub async fn ensure_harbor_project(&self, project: &str) -> Result<(), RegistryError> {
        let url = self.url("/api/v2.0/projects");
        let body =
            serde_json::json!({ "project_name": project, "metadata": { "public": "false" } });
        let mut request = self.http.post(&url).json(&body);
        if let Some(credentials) = &self.credentials {
            request = request.basic_auth(&credentials.user, Some(&credentials.password));
        }
        let response = request.send().await.map_err(|err| self.unreachable(err))?;
        match response.status() {
            StatusCode::CREATED | StatusCode::CONFLICT => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(self.unauthorized(format!("Harbor refused to create project {project:?}")))
            }
            _ => Err(self
                .refused(&format!("creating Harbor project {project:?}"), response)
                .await),
        }
    }
}

/// `sha256:<hex>` with the ':' escaped for a query string.
fn encode_digest(digest: &str) -> String {
    digest.replace(':', "%3A")
}

/// An error with its sources ("error sending request: connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
