// Findings of the scanners that this design accepts, recorded where the
// resource is made, each with its reason: cdk-nag (v3) reads CDK's
// `Validations.of(construct).acknowledge`; checkov reads
// `Metadata.checkov.skip` of the CloudFormation resource.
'use strict';

const { CfnResource, Validations } = require('aws-cdk-lib');

/**
 * Acknowledges cdk-nag findings on `construct` (and its children). A rule
 * that reports several findings names each: `AwsSolutions-IAM5[Resource::*]`.
 * @param {import('constructs').IConstruct} construct
 * @param {{id: string, reason: string}[]} findings
 */
function nag(construct, findings) {
  for (const finding of findings) {
    Validations.of(construct).acknowledge(finding);
  }
}

/**
 * Skips checkov checks on the CloudFormation resource behind `construct`
 * (the construct itself or its default child).
 * @param {import('constructs').IConstruct} construct
 * @param {{id: string, comment: string}[]} checks
 */
function checkov(construct, checks) {
  const resource = CfnResource.isCfnResource(construct) ? construct : construct.node.defaultChild;
  if (!resource || !CfnResource.isCfnResource(resource)) {
    throw new Error(`checkov skips need a CloudFormation resource: ${construct.node.path}`);
  }
  const existing = resource.getMetadata('checkov') || { skip: [] };
  resource.addMetadata('checkov', { skip: [...existing.skip, ...checks] });
}

module.exports = { nag, checkov };
