//! A [`Target`] over an `object_store` bucket: S3 (and R2, MinIO, SeaweedFS, Ceph) and Azure
//! Blob share it; their modules only build the store (GCS has its own, [`super::gcs`]).
//!
//! Reads are plain GETs (bytes, ETag, Content-Type, Cache-Control). Writes are single PUTs
//! with `Content-Type` and `Cache-Control` and no ACL header, conditional on what was read:
//! `PutMode::Create` (`If-None-Match: *`) or `PutMode::Update` (`If-Match: <etag>`). A failed
//! condition (412, or S3's 409 under concurrent writes, which object_store retries first)
//! becomes [`TargetError::Conflict`].

use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion,
};

use super::{BoxFuture, Condition, Object, Stored, Target, TargetError, Version};

/// A bucket (or container) through `object_store`.
#[derive(Debug, Clone)]
pub struct StoreTarget {
    name: String,
    store: Arc<dyn ObjectStore>,
}

impl StoreTarget {
    pub fn new(name: String, store: Arc<dyn ObjectStore>) -> Self {
        StoreTarget { name, store }
    }

    fn path(&self, key: &str) -> Result<StorePath, TargetError> {
        StorePath::parse(key)
            .map_err(|e| TargetError::Failed(format!("invalid object key {key:?}: {e}")))
    }
}

/// The whole error chain in one line ([`crate::errors::chain`]), with an S3 or Azure XML error
/// document in it condensed: object_store puts the store's answer in the sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    condense_xml_error(&crate::errors::chain(e))
}

/// The text between `<name>` and `</name>`.
fn between<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + text[start..].find(&format!("</{name}>"))?;
    Some(&text[start..end])
}

/// An S3 or Azure XML error document inside a message (`<?xml ...><Error><Code>..`, many
/// lines) becomes `Code: first line of Message`, so each report line stays one line.
fn condense_xml_error(text: &str) -> String {
    let Some(start) = text.find("<?xml").or_else(|| text.find("<Error>")) else {
        return text.to_string();
    };
    let Some(end) = text[start..]
        .find("</Error>")
        .map(|i| start + i + "</Error>".len())
    else {
        return text.to_string();
    };
    let xml = &text[start..end];
    let code = between(xml, "Code").map(str::trim).unwrap_or_default();
    let message = between(xml, "Message")
        .and_then(|m| m.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or_default();
    let summary = match (code.is_empty(), message.is_empty()) {
        (true, true) => return text.to_string(),
        (false, true) => code.to_string(),
        (true, false) => message.to_string(),
        (false, false) => format!("{code}: {message}"),
    };
    let rest = text[end..].trim_start();
    format!(
        "{}{summary}{}{rest}",
        &text[..start],
        if rest.is_empty() { "" } else { " " }
    )
}

fn attribute(attributes: &Attributes, key: &Attribute) -> Option<String> {
    attributes.get(key).map(|v| v.as_ref().to_string())
}

impl Target for StoreTarget {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, TargetError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            let result = match self.store.get_opts(&path, GetOptions::default()).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(TargetError::Failed(error_chain(&e))),
            };
            let version = Version {
                e_tag: result.meta.e_tag.clone(),
                version: result.meta.version.clone(),
            };
            let content_type = attribute(&result.attributes, &Attribute::ContentType);
            let cache_control = attribute(&result.attributes, &Attribute::CacheControl);
            let bytes = result
                .bytes()
                .await
                .map_err(|e| TargetError::Failed(error_chain(&e)))?;
            Ok(Some(Stored {
                bytes: bytes.to_vec(),
                version,
                content_type,
                cache_control,
                problems: Vec::new(),
            }))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        object: Object<'a>,
        condition: Condition,
    ) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            let mut attributes = Attributes::new();
            attributes.insert(
                Attribute::ContentType,
                object.content_type.to_string().into(),
            );
            attributes.insert(
                Attribute::CacheControl,
                object.cache_control.to_string().into(),
            );
            let mode = match condition {
                Condition::Create => PutMode::Create,
                Condition::Update(v) => PutMode::Update(UpdateVersion {
                    e_tag: v.e_tag,
                    version: v.version,
                }),
            };
            let options = PutOptions {
                mode,
                attributes,
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(object.bytes.to_vec()), options)
                .await
            {
                Ok(_) => Ok(()),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => Err(TargetError::Conflict),
                Err(e) => Err(TargetError::Failed(error_chain(&e))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::condense_xml_error;

    #[test]
    fn an_xml_error_document_becomes_one_line() {
        // What Azurite answered to a wrong account key.
        let azure = "Error performing GET http://127.0.0.1:1/a/b in 3ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<Error>\n  <Code>AuthorizationFailure</Code>\n  <Message>Server failed to authenticate the request.\nRequestId:fbe63a84\nTime:2026-12-07T01:08:41.812Z</Message>\n</Error>";
        assert_eq!(
            condense_xml_error(azure),
            "Error performing GET http://127.0.0.1:1/a/b in 3ms - Server returned non-2xx status code: 403 Forbidden: AuthorizationFailure: Server failed to authenticate the request."
        );
        let s3 = "403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code><Message>The signature does not match</Message><Resource>/b/k</Resource></Error> (after 1 retry)";
        assert_eq!(
            condense_xml_error(s3),
            "403 Forbidden: SignatureDoesNotMatch: The signature does not match (after 1 retry)"
        );
        for plain in ["no xml here", "<Error> never closed", "<Error></Error>"] {
            assert_eq!(condense_xml_error(plain), plain);
        }
    }
}
