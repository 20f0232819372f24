// The public edge: an internet-facing ALB (HTTPS only, TLS 1.2+, invalid
// headers dropped, access logs to S3) with AWS WAF in front of it.
'use strict';

const { Aws, CfnMapping, Duration, RemovalPolicy } = require('aws-cdk-lib');
const ec2 = require('aws-cdk-lib/aws-ec2');
const elbv2 = require('aws-cdk-lib/aws-elasticloadbalancingv2');
const iam = require('aws-cdk-lib/aws-iam');
const s3 = require('aws-cdk-lib/aws-s3');
const { FactName, RegionInfo } = require('aws-cdk-lib/region-info');
const wafv2 = require('aws-cdk-lib/aws-wafv2');
const { Construct } = require('constructs');
const { nag, checkov } = require('./suppress');

class Ingress extends Construct {
  /**
   * @param {Construct} scope
   * @param {string} id
   * @param {{vpc: ec2.IVpc, certificateArn: string}} props
   */
  constructor(scope, id, props) {
    super(scope, id);
    const logs = new s3.Bucket(this, 'AccessLogs', {
      // ALB log delivery writes with S3-managed keys only.
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      enforceSSL: true,
      versioned: true,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      lifecycleRules: [{ expiration: Duration.days(90), noncurrentVersionExpiration: Duration.days(7) }],
      removalPolicy: RemovalPolicy.RETAIN,
    });
    nag(logs, [{ id: 'AwsSolutions::AwsSolutions-S1', reason: 'this is the access-log bucket: logging its own access would log into itself' }]);
    checkov(logs, [{ id: 'CKV_AWS_18', comment: 'this is the access-log bucket: logging its own access would log into itself' }]);

    const securityGroup = new ec2.SecurityGroup(this, 'SecurityGroup', {
      vpc: props.vpc,
      description: 'eventflow load balancer: HTTPS from anywhere',
      allowAllOutbound: false,
    });
    securityGroup.addIngressRule(ec2.Peer.anyIpv4(), ec2.Port.tcp(443), 'HTTPS from producers and subscribers');
    nag(securityGroup, [{ id: 'AwsSolutions::AwsSolutions-EC23', reason: 'the public API: producers connect from anywhere, over HTTPS only, authenticated by bearer tokens' }]);

    /** The load balancer. */
    this.loadBalancer = new elbv2.ApplicationLoadBalancer(this, 'LoadBalancer', {
      vpc: props.vpc,
      internetFacing: true,
      securityGroup,
      dropInvalidHeaderFields: true,
      deletionProtection: true,
      // Longer than the SSE keep-alive comments (15 s) so that idle streams stay up.
      idleTimeout: Duration.seconds(60),
    });
    this.logAccessLogs(logs);
    /** The HTTPS listener the service's targets join. */
    this.listener = this.loadBalancer.addListener('Https', {
      port: 443,
      protocol: elbv2.ApplicationProtocol.HTTPS,
      certificates: [elbv2.ListenerCertificate.fromArn(props.certificateArn)],
      sslPolicy: elbv2.SslPolicy.RECOMMENDED_TLS,
      open: false,
    });

    // AWS WAF: the managed common and known-bad-input rules, and a rate
    // limit per client address. Counted, not enforced: the 8 KB body rule
    // (batches are up to 16 MiB by design), the body rules that read
    // payloads as HTML or URLs (an event's payload is the client's data),
    // and the missing User-Agent rule (producers are programs).
    const acl = new wafv2.CfnWebACL(this, 'WebAcl', {
      scope: 'REGIONAL',
      defaultAction: { allow: {} },
      visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: 'eventflow', sampledRequestsEnabled: true },
      rules: [
        managedRule('common', 'AWSManagedRulesCommonRuleSet', 1,
          ['SizeRestrictions_BODY', 'CrossSiteScripting_BODY', 'GenericRFI_BODY', 'NoUserAgent_HEADER']
            .map((rule) => ({ name: rule, actionToUse: { count: {} } }))),
        managedRule('bad-inputs', 'AWSManagedRulesKnownBadInputsRuleSet', 2, []),
        {
          name: 'per-address-rate',
          priority: 3,
          action: { block: {} },
          statement: { rateBasedStatement: { limit: 100000, aggregateKeyType: 'IP' } },
          visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: 'per-address-rate', sampledRequestsEnabled: true },
        },
      ],
    });
    new wafv2.CfnWebACLAssociation(this, 'WebAclAssociation', {
      resourceArn: this.loadBalancer.loadBalancerArn,
      webAclArn: acl.attrArn,
    });
  }

  /**
   * Access logs to `bucket` without knowing the region at synth time (CDK's
   * logAccessLogs needs it): the region's Elastic Load Balancing account
   * from a mapping of CDK's region table, and the log-delivery service
   * principal. The mapping holds the regions opened before August 2022; a
   * newer region has no account there and fails the deployment (docs/aws.md).
   */
  logAccessLogs(bucket) {
    const prefix = 'alb';
    const accounts = RegionInfo.regionMap(FactName.ELBV2_ACCOUNT);
    const mapping = new CfnMapping(this, 'ElbAccounts', {
      mapping: Object.fromEntries(Object.entries(accounts).map(([region, account]) => [region, { account }])),
    });
    const objects = bucket.arnForObjects(`${prefix}/AWSLogs/${Aws.ACCOUNT_ID}/*`);
    bucket.addToResourcePolicy(new iam.PolicyStatement({
      actions: ['s3:PutObject'],
      principals: [new iam.AccountPrincipal(mapping.findInMap(Aws.REGION, 'account'))],
      resources: [objects],
    }));
    bucket.addToResourcePolicy(new iam.PolicyStatement({
      actions: ['s3:PutObject'],
      principals: [new iam.ServicePrincipal('logdelivery.elasticloadbalancing.amazonaws.com')],
      resources: [objects],
    }));
    this.loadBalancer.setAttribute('access_logs.s3.enabled', 'true');
    this.loadBalancer.setAttribute('access_logs.s3.bucket', bucket.bucketName);
    this.loadBalancer.setAttribute('access_logs.s3.prefix', prefix);
    // The load balancer checks that it may write when logging is turned on.
    if (bucket.policy) this.loadBalancer.node.addDependency(bucket.policy);
  }
}

/** A WAF rule that applies an AWS managed rule group, some of its rules overridden. */
function managedRule(name, group, priority, overrides) {
  return {
    name,
    priority,
    overrideAction: { none: {} },
    statement: { managedRuleGroupStatement: { vendorName: 'AWS', name: group, ruleActionOverrides: overrides.length ? overrides : undefined } },
    visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: name, sampledRequestsEnabled: true },
  };
}

module.exports = { Ingress };
