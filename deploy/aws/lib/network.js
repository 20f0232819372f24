// The VPC: three AZs, public subnets for the load balancer and the NAT
// gateways, private subnets for the tasks and the NATS nodes; flow logs.
'use strict';

const { RemovalPolicy } = require('aws-cdk-lib');
const ec2 = require('aws-cdk-lib/aws-ec2');
const logs = require('aws-cdk-lib/aws-logs');
const { Construct } = require('constructs');

class Network extends Construct {
  /**
   * @param {Construct} scope
   * @param {string} id
   * @param {{key: import('aws-cdk-lib/aws-kms').IKey}} props
   */
  constructor(scope, id, props) {
    super(scope, id);
    /** The VPC. */
    this.vpc = new ec2.Vpc(this, 'Vpc', {
      ipAddresses: ec2.IpAddresses.cidr('10.40.0.0/16'),
      maxAzs: 3,
      // One NAT gateway an AZ: losing an AZ does not cut the others'
      // egress (image pulls, Secrets Manager, AMP, X-Ray).
      natGateways: 3,
      subnetConfiguration: [
        { name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 },
        { name: 'private', subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS, cidrMask: 20 },
      ],
      restrictDefaultSecurityGroup: true,
    });
    // ECR's image layers come from S3: fetched without NAT charges.
    this.vpc.addGatewayEndpoint('S3', { service: ec2.GatewayVpcEndpointAwsService.S3 });

    const flowLogs = new logs.LogGroup(this, 'FlowLogs', {
      retention: logs.RetentionDays.ONE_MONTH,
      encryptionKey: props.key,
      removalPolicy: RemovalPolicy.RETAIN,
    });
    this.vpc.addFlowLog('FlowLog', {
      destination: ec2.FlowLogDestination.toCloudWatchLogs(flowLogs),
      trafficType: ec2.FlowLogTrafficType.REJECT,
      maxAggregationInterval: ec2.FlowLogMaxAggregationInterval.TEN_MINUTES,
    });
  }
}

module.exports = { Network };
